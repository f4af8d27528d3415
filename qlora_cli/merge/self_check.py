"""The self-check: logits of the merged model against the adapter on its base, with limits that depend on
the precision involved."""

from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from qlora_cli.layout import MODEL_CONFIG
from qlora_cli.merge.plan import is_quantized_in_training, model_skeleton, not_quantized_modules
from qlora_cli.model.adapter_io import adapter_modules
from qlora_cli.model.loading import NO_HUB_KERNELS, autocast
from qlora_cli.run_folder import RunFolder

# Self-check thresholds. The merged model (loaded in float32) is compared with the adapter on its base, run
# in the run's compute dtype as in training. Limits depend on the precision involved:
#   exact: float32 compute and float32 output. A correct merge agrees to ~1e-6 in the logits (mean KL ~1e-7,
#          the float32 floor of the KL itself).
#   16-bit: bf16/fp16 compute or a 16-bit output. Rounding alone gives a mean KL of ~1e-5 on the tiny test
#          models (expect up to ~1e-3 on large ones) and flips the top token only where two tokens nearly
#          tie, so top-1 is judged where the adapter's top token leads by a clear margin.
# A corrupted merge (delta missing, wrong sign, scale, layout or layer) moves the output by a sizeable
# fraction of what the adapter itself does: it fails the absolute limits when the adapter matters much,
# else the one relative to the adapter's own effect, KL(adapter || base without adapter).


@dataclass(frozen=True)
class CheckLimits:
    max_kl: float  # mean KL(adapter || merged) per position, nats
    min_top1: float  # top-1 agreement over positions where the adapter's top token leads by >= TOP1_MARGIN
    max_effect_fraction: float  # KL(adapter || merged) / KL(adapter || base), checked when the latter is ...
    min_effect: float  # ... at least this large (below it the adapter's effect is within rounding noise)


CHECK_LIMITS = {
    "exact": CheckLimits(max_kl=1e-5, min_top1=0.99, max_effect_fraction=0.01, min_effect=1e-4),
    "16-bit": CheckLimits(max_kl=1e-2, min_top1=0.98, max_effect_fraction=0.1, min_effect=1e-2),
    # qlora export's 8-bit and 4/5-bit GGUF files: their quantization error comes on top of the merge's
    "q8_0": CheckLimits(max_kl=2e-2, min_top1=0.95, max_effect_fraction=0.5, min_effect=1e-2),
    "4/5-bit": CheckLimits(max_kl=0.15, min_top1=0.85, max_effect_fraction=1.0, min_effect=5e-2),
}
TOP1_MARGIN = 0.5  # logits
CHECK_PROMPTS = 8
CHECK_TOKENS = 64
BUILTIN_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. The dog did not move.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "Translate to German: The weather is nice today.\nGerman: Das Wetter ist heute schön.",
    "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144",
)


@dataclass
class CheckResult:
    n_prompts: int
    n_positions: int
    max_abs_logit_diff: float  # merged vs adapter on its base
    mean_kl: float  # KL(adapter || merged), nats per position
    top1_agreement: float  # over all positions
    top1_decisive: float  # over positions where the adapter's top token leads by >= TOP1_MARGIN
    adapter_kl: float  # KL(adapter || base without adapter): how much the adapter changes the model
    adapter_top1: float
    limits: str  # "exact" or "16-bit": which CHECK_LIMITS applied
    prompts_from: str  # "eval data", "training data" or "built-in prompts"
    reference: str  # what the merged model was compared with
    training_kl: float | None = None  # --base-weights original on a 4-bit run: KL(training-time model || merged)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------
# self-check


def check_prompts(
    run: RunFolder, tokenizer: Any, n: int = CHECK_PROMPTS, max_len: int = CHECK_TOKENS
) -> tuple[list[list[int]], str]:
    """(token ids of up to ``n`` prompts, where they came from): the run's eval data, else its training data
    (local files only), else a built-in set. Whole examples (prompt + answer), so the adapter's effect shows."""
    from qlora_cli.data.pipeline import read_rows, tokenize_row
    from qlora_cli.errors import QLoRAError

    cfg = run.config
    sources = [] if cfg is None else [(cfg.eval_datasets, "eval data"), (cfg.datasets, "training data")]
    for specs, label in sources:
        ids: list[list[int]] = []
        for spec in specs:
            if not Path(spec.path).expanduser().exists():
                continue
            try:
                for row in read_rows(spec)[: n - len(ids)]:
                    ids.append(tokenize_row(row, spec.type, tokenizer, True).input_ids[:max_len])
            except QLoRAError:
                continue
            if len(ids) >= n:
                break
        ids = [i for i in ids if len(i) >= 2]
        if ids:
            return ids, label
    prompts = [list(tokenizer(p)["input_ids"])[:max_len] for p in BUILTIN_PROMPTS[:n]]
    return [p for p in prompts if len(p) >= 2], "built-in prompts"


@torch.no_grad()
def _logits(model: Any, prompts: list[list[int]], device: torch.device, autocast: Any) -> list[torch.Tensor]:
    """Next-token logits at every position of each prompt, float32 on CPU: [(T_i, V)]. One right-padded batch;
    the attention mask keeps the padding out of every real position."""
    T = max(len(p) for p in prompts)
    input_ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with autocast():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    return [logits[i, : len(p)].float().cpu() for i, p in enumerate(prompts)]


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """(max |Δlogit|, mean KL(reference || other) per position, top-1 agreement, top-1 agreement where the
    reference's top token leads by at least ``TOP1_MARGIN``; 1.0 when there is no such position)."""
    ref, oth = torch.cat(reference), torch.cat(other)  # (N, V)
    max_diff = (ref - oth).abs().max().item()
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(oth, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).mean().item()
    agree = ref.argmax(-1) == oth.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= TOP1_MARGIN
    top1_decisive = agree[decisive].float().mean().item() if decisive.any() else 1.0
    return max_diff, kl, agree.float().mean().item(), top1_decisive


def reference_skip_modules(run: RunFolder) -> list[str] | None:
    """Module patterns to keep 16-bit in the self-check's reference, or None when the reference is the
    training-time base itself.

    The merge adds the delta to dequant(NF4(W)) only in the layers the adapter targets and copies every
    other tensor bit for bit, so where the run also held untargeted linear layers in 4 bits, the model the
    merge claims to equal is the training-time base with those layers at their base weights.
    """
    from qlora_cli.model.lora import linear_module_names

    if not run.model.quant.load_in_4bit:
        return None
    skeleton = model_skeleton(Path(run.model.base_model), run.model.trust_remote_code)
    targeted = set(adapter_modules(run.tensors, f"adapter {run.path}"))
    skip = not_quantized_modules(skeleton)
    untargeted = [
        n
        for n in linear_module_names(skeleton, include_head=True)
        if n not in targeted and is_quantized_in_training(n, skip)
    ]
    return skip + [re.escape(n) for n in untargeted] if untargeted else None


def load_reference(run: RunFolder, device: torch.device, base_weights: str) -> tuple[Any, str, bool]:
    """(the adapter on the base the merged model must equal, what that is, whether it is the training-time
    model). With ``original``: the 16-bit base. With ``dequantized``: the training-time base, except that
    untargeted linear layers keep their base weights (see ``reference_skip_modules``)."""
    from qlora_cli.run_folder import load_adapted_model

    quant = run.model.quant
    if not quant.load_in_4bit:
        return load_adapted_model(run, device)[0], "the adapter on its 16-bit training-time base", True
    if base_weights == "original":
        sixteen = replace(run.model, quant=replace(quant, load_in_4bit=False))
        return load_adapted_model(run, device, model=sixteen)[0], "the adapter on the 16-bit base", False
    skip = reference_skip_modules(run)
    if skip is None:
        return load_adapted_model(run, device)[0], "the adapter on its 4-bit training-time base", True
    return _load_partly_quantized(run, device, skip), "the adapter on its 4-bit base (targeted layers)", False


def _load_partly_quantized(run: RunFolder, device: torch.device, skip: list[str]) -> Any:
    """``load_adapted_model`` with the modules matching ``skip`` left unquantized (in the compute dtype)."""
    from qlora_cli.model.adapter_io import load_adapter
    from qlora_cli.model.loading import load_base_model

    model = load_base_model(run.model, device, keep_16bit=skip)
    load_adapter(model, run.path, run.adapter)
    return model.eval()


def self_check(
    run: RunFolder,
    merged_dir: Path,
    base_weights: str,
    device: torch.device,
    tokenizer: Any = None,
    *,
    load_candidate: Any = None,
    limits: str | None = None,
) -> CheckResult:
    """Run a few prompts through the adapter on its base (``load_reference``) and through the merged model
    loaded by plain transformers in float32; compare the logits. Where the reference is not the training-time
    model (``original``, or untargeted layers the run held in 4 bits), the distance to the training-time
    model is reported too: that gap is quantization error, not a merge error."""
    import gc

    from transformers import AutoModelForCausalLM

    from qlora_cli.model.loading import load_tokenizer
    from qlora_cli.model.lora import lora_disabled
    from qlora_cli.run_folder import load_adapted_model

    tokenizer = tokenizer or load_tokenizer(run.model)
    prompts, source = check_prompts(run, tokenizer)
    autocast = _autocast(run.model.quant.compute_dtype, device)
    model, what, is_training_model = load_reference(run, device, base_weights)
    ref = _logits(model, prompts, device, autocast)
    with lora_disabled(model):
        base = _logits(model, prompts, device, autocast)
    del model
    training = None
    if not is_training_model:
        model, _ = load_adapted_model(run, device)
        training = _logits(model, prompts, device, autocast)
        del model
    gc.collect()
    if load_candidate is None:
        merged_model = AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=torch.float32, device_map={"": device}, **NO_HUB_KERNELS
        )
    else:
        merged_model = load_candidate()
    merged = _logits(merged_model.eval(), prompts, device, nullcontext)
    del merged_model
    gc.collect()

    if limits is None:
        merged_dtype = json.loads((Path(merged_dir) / MODEL_CONFIG).read_text()).get("dtype")
        exact = run.model.quant.compute_dtype == "float32" and merged_dtype == "float32"
        limits = "exact" if exact else "16-bit"
    max_diff, kl, top1, top1_decisive = compare_logits(ref, merged)
    _, adapter_kl, adapter_top1, _ = compare_logits(ref, base)
    result = CheckResult(
        n_prompts=len(prompts),
        n_positions=sum(len(p) for p in prompts),
        max_abs_logit_diff=max_diff,
        mean_kl=kl,
        top1_agreement=top1,
        top1_decisive=top1_decisive,
        adapter_kl=adapter_kl,
        adapter_top1=adapter_top1,
        limits=limits,
        prompts_from=source,
        reference=what,
        training_kl=None if training is None else compare_logits(training, merged)[1],
    )
    lim = CHECK_LIMITS[result.limits]
    if not math.isfinite(kl) or kl > lim.max_kl:
        result.problems.append(f"mean KL {kl:.3g} > {lim.max_kl:g}")
    if top1_decisive < lim.min_top1:
        result.problems.append(
            f"top-1 agreement {top1_decisive:.1%} < {lim.min_top1:.0%} where the adapter's choice is clear"
        )
    if adapter_kl >= lim.min_effect and kl > lim.max_effect_fraction * adapter_kl:
        result.problems.append(
            f"the merged model is {kl / adapter_kl:.1%} of the adapter's own effect away from the adapter "
            f"(mean KL {kl:.3g} vs {adapter_kl:.3g}; allowed {lim.max_effect_fraction:.0%})"
        )
    return result


def _autocast(compute_dtype: str, device: torch.device) -> Any:
    """Run the reference as training ran it: autocast to the compute dtype unless it is float32."""
    return partial(autocast, compute_dtype, device)
