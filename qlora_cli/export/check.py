"""The export's self-check: the written GGUF file read back by transformers' own GGUF loader (an independent
reader: it parses the metadata into a config and a tokenizer, and un-permutes and dequantizes the tensors)
and compared with the adapter on its base: logits on a few prompts (``merge.self_check`` with the limits
of the file's precision) and token ids on texts that exercise the special tokens and the chat template."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qlora_cli.export.gguf_arch import rope_settings
from qlora_cli.merge import MergeSource
from qlora_cli.merge.self_check import BUILTIN_PROMPTS, CHECK_LIMITS, CheckResult, self_check
from qlora_cli.model.loading import NO_HUB_KERNELS, quiet_libraries

# --quant -> which CHECK_LIMITS judge the file (f32 is "exact" only when the run computed in float32)
LIMITS = {"f16": "16-bit", "bf16": "16-bit", "q8_0": "q8_0", "q4_0": "4/5-bit", "q4_1": "4/5-bit", "q5_0": "4/5-bit"}
LIMITS |= {"q5_1": "4/5-bit", "q6_k": "q8_0", "q4_k_m": "4/5-bit"}

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
]


def limits_for(quant: str, compute_dtype: str) -> str:
    if quant == "f32":
        return "exact" if compute_dtype == "float32" else "16-bit"
    return LIMITS[quant]


@contextmanager
def alone(path: Path) -> Iterator[Path]:
    """``path`` as the only file of a private folder: transformers given a folder and ``gguf_file`` also reads
    the folder's other files (adapter_config.json redirects it through PEFT; a tokenizer_config.json or
    chat_template.jinja replaces the file's own)."""
    with tempfile.TemporaryDirectory(prefix="qlora-gguf-check-") as folder:
        link = Path(folder) / "model.gguf"
        try:
            os.link(path, link)  # same inode; no copy
        except OSError:  # another file system
            link.symlink_to(path.resolve())
        yield link


def load_gguf_model(
    path: Path, device: torch.device, config_folder: Path | None = None, vocab_size: int | None = None
) -> Any:
    """The GGUF file as a transformers model in float32. ``config_folder``: take the config from there instead
    of the file's metadata (for what transformers does not read back, e.g. Llama 3.1's rope scaling), with
    ``vocab_size`` (a vocabulary grown for new tokens) when given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_libraries()
    kwargs: dict[str, Any] = {}
    if config_folder is not None:
        kwargs["config"] = AutoConfig.from_pretrained(config_folder)
        if vocab_size is not None:
            kwargs["config"].vocab_size = vocab_size
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:  # its per-tensor bar (tqdm.auto, not transformers' switch) would interleave with qlora's
        gguf_utils.tqdm = lambda items, **_: items
    try:
        with alone(path) as file:
            return AutoModelForCausalLM.from_pretrained(
                file.parent,
                gguf_file=file.name,
                dtype=torch.float32,
                device_map={"": device},
                **NO_HUB_KERNELS,
                **kwargs,
            )
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar


def check_texts(tokenizer: Any) -> list[str]:
    """Texts whose token ids must be the same in the file's tokenizer: plain prose and code, every special
    token of the tokenizer, and a conversation rendered by the run's chat template."""
    # (no text starts with a space: transformers' GGUF reader prefixes "▁" by Metaspace, so a leading space
    # comes out one "▁" short of the sentencepiece tokenizers' and llama.cpp's own encoding)
    texts = list(BUILTIN_PROMPTS) + ["Two  spaces,\ttabs\n\nand 12345 digits; émigré 東京 🙂"]
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    if specials:
        texts.append("x" + " x".join(specials) + " y")
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True))
    return texts


def tokenizer_problems(tokenizer: Any, path: Path) -> tuple[list[str], str | None]:
    """(where the file's tokenizer, as transformers reads it, gives other ids than the run's tokenizer; a note
    when the reader cannot judge)."""
    from transformers import AutoTokenizer

    quiet_libraries()
    if not modern_tokenizer_reader():
        # transformers 5.0's GGUF tokenizer reader splits every byte-level file with GPT-2's pattern, adds no
        # BOS to Gemma's and rebuilds sentencepiece merges its own way: its ids differ from the run's (and from
        # llama.cpp's, which reads the metadata itself) through no fault of the file. It cannot judge.
        import transformers

        return [], f"token ids not compared: transformers {transformers.__version__}'s GGUF tokenizer reader is too old"
    with alone(path) as file:
        theirs = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    texts = check_texts(tokenizer)
    model, pre = _file_field(path, "tokenizer.ggml.model"), _file_field(path, "tokenizer.ggml.pre")
    if model == "gpt2" and pre not in ("gpt-2", "smollm", "default", None) and not reader_splits_like(pre):
        # a reader without this pre-tokenizer in its table splits with GPT-2's pattern instead
        return [], f"token ids not compared: this transformers' GGUF reader ignores the {pre!r} pre-tokenizer"
    if model == "llama":
        # sentencepiece: the run's tokenizer and llama.cpp prefix "▁" to the text after a special token too
        # (Llama 2's "legacy" behaviour); transformers' reader does not, so only texts without one compare
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        texts = [t for t in texts if not any(s in t for s in specials)]
    problems = []
    for text in texts:
        ours_ids = list(tokenizer(text)["input_ids"])
        their_ids = list(theirs(text)["input_ids"])
        if ours_ids != their_ids:
            problems.append(
                f"the file's tokenizer encodes {text[:40]!r} differently ({their_ids[:8]}... vs {ours_ids[:8]}...)"
            )
            break
    template = getattr(tokenizer, "chat_template", None)
    if template and getattr(theirs, "chat_template", None) != template:
        problems.append("the file's chat template is not the run's")
    return problems, None


def modern_tokenizer_reader() -> bool:
    """Whether transformers has the GGUF tokenizer reader that rebuilds llama.cpp's tokenizers faithfully
    (``integrations.gguf.gguf_tokenizer_mapping``; 5.24 has it, 5.0 does not)."""
    import importlib.util

    try:
        return importlib.util.find_spec("transformers.integrations.gguf.gguf_tokenizer_mapping") is not None
    except ModuleNotFoundError:
        return False


def reader_splits_like(pre: str) -> bool:
    """Whether the installed transformers' GGUF reader applies llama.cpp's pre-tokenizer ``pre``."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return False
    return pre in GGUF_PRE_TOKENIZER_SPLITS


def check_export(
    source: MergeSource, path: Path, quant: str, base_weights: str, device: torch.device, console: Console
) -> CheckResult:
    """Logits and tokenizer of the GGUF file against the adapter on its base; prints the verdict."""
    limits = limits_for(quant, source.run.model.quant.compute_dtype)
    # transformers' reader does not read back Llama 3.1's rope scaling, nor Gemma 2's softcapping and query
    # scale (it takes its defaults): those models are checked with the base's config, and llama.cpp-specific
    # keys are covered by the llama.cpp tests
    unread = rope_settings(source.config)["rope_type"] != "default" or source.config.get("model_type") == "gemma2"
    config_folder = source.folder if unread else None
    result = self_check(
        source.run,
        path.parent,
        base_weights,
        device,
        tokenizer=source.tokenizer,
        load_candidate=lambda: load_gguf_model(path, device, config_folder, int(source.config["vocab_size"])),
        limits=limits,
    )
    problems, tokenizer_note = tokenizer_problems(source.tokenizer, path)
    result.problems.extend(problems)
    lim = CHECK_LIMITS[limits]
    tokenizer_verdict = tokenizer_note or ("DIFFERS" if problems else "same ids")
    verdict = "[green]passed[/green]" if result.passed else "[red]FAILED[/red]"
    console.print(
        f"self-check {verdict} (read back by transformers' GGUF loader, {result.n_prompts} prompts from "
        f"{result.prompts_from}, {result.n_positions} positions): mean KL {result.mean_kl:.3g} (limit "
        f"{lim.max_kl:g}), top-1 agreement {result.top1_agreement:.1%} ({result.top1_decisive:.1%} where the "
        f"adapter's choice is clear, limit {lim.min_top1:.0%}); the adapter itself moves the base by KL "
        f"{result.adapter_kl:.3g}; tokenizer: {tokenizer_verdict}"
    )
    for problem in result.problems:
        console.print(f"[red]  {problem}[/red]")
    rounding = math.isfinite(result.mean_kl) and not problems  # NaN logits or a wrong tokenizer: not rounding
    if not result.passed and limits in ("q8_0", "4/5-bit") and rounding:
        console.print(
            f"  {quant} rounds this model's weights enough to change its answers beyond the limits (small models "
            "suffer most); try a wider type (q8_0, f16), or keep the file anyway with --no-verify"
        )
    return result


def _file_field(path: Path, key: str) -> Any:
    from gguf import GGUFReader

    from qlora_cli.model.gguf import field_value

    field = GGUFReader(path).fields.get(key)
    return None if field is None else field_value(field)
