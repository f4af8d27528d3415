"""Training-step speed and memory: qlora versus Hugging Face PEFT + bitsandbytes (and Unsloth where installed).

    python scripts/bench.py --preset cpu-tiny            # `make bench`; under 3 minutes on 2 CPU cores
    python scripts/bench.py --preset gpu-1b              # Llama-3.2-1B shape, micro-batch 4, seq 2048, bf16
    python scripts/bench.py --preset gpu-8b              # Llama-3.1-8B shape, micro-batch 2, memory-saving
    python scripts/bench.py --preset gpu-8b-longctx      # longest sequence that trains in 24 GiB, each stack
    python scripts/bench.py --preset cpu-packing         # qlora with and without sample packing, Alpaca-like lengths
    python scripts/bench.py --preset cpu-smollm2 --model models/SmolLM2-135M-Instruct.Q4_1.gguf
                                                         # a real model (folder or GGUF): also FLOP/s vs the GEMM rate

Same random-init model (saved once, loaded by both stacks from the same folder), same token batch, LoRA
r=16 on all linear layers, paged 8-bit AdamW, same precision and recomputation mode. Speed: both stacks
live in one process and take steps alternately after a warm-up; the median step time gives tokens/s, and the
ratio of each step to the other stack's next one shows how far a single run's ratio can move.
Peak memory: each stack in its own subprocess (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS
above the process's RSS before the model was loaded). The last line is
`speedup_vs_peft=X.XX memory_vs_peft=Y.YY` for the preset's first mode.

With ``--model`` both stacks load that model instead (a GGUF file is converted once, by qlora, into a float32
safetensors folder that both then load and quantize alike) and the report adds each stack's achieved model
FLOP/s as a fraction of this machine's fp32 GEMM rate, measured in the same run on the model's own matrix
shapes: the physical limit of a CPU step. Model FLOPs per step count the frozen base's matmuls forward and
input-gradient (4 x its linear parameters per token; the output head only at positions with a target), the LoRA
matmuls forward and both gradients (6 x), and attention's score and value products (forward and backward:
12 x layers x tokens x sequence x hidden).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool = False


@dataclass
class Preset:
    shape: Shape | None  # None: a real model, named with --model
    device: str
    dtype: str  # compute dtype
    micro_batch: int
    seq: int
    modes: list[str]  # "memory-saving" (recompute) and/or "no-recompute"
    steps: int = 6
    warmup: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


# PEFT's reference recipe (setup_peft) as measured for issue 13 on an H200 (torch 2.11, transformers 5.17, seq 2048):
# (preset, mode) -> (tokens/s, peak GiB). Printed beside PEFT's figures here, to show the same thing was measured.
PEFT_REFERENCE = {
    ("gpu-1b", "memory-saving"): (29_738, 13.4),
    ("gpu-1b", "no-recompute"): (39_823, 27.1),
    ("gpu-8b", "memory-saving"): (6_442, 12.5),
}
LLAMA_1B = Shape(2048, 8192, 16, 32, 8, 128256, tie=True)
LLAMA_8B = Shape(4096, 14336, 32, 32, 8, 128256)
PRESETS = {
    # a 1B-like proportion (head ~1/4 of the weights) at a size 2 CPU cores step through in seconds
    "cpu-tiny": Preset(Shape(512, 1376, 4, 8, 2, 8192), "cpu", "float32", 4, 256, ["no-recompute"], steps=16),
    "gpu-1b": Preset(LLAMA_1B, "cuda", "bfloat16", 4, 2048, ["memory-saving", "no-recompute"], steps=10),
    "gpu-8b": Preset(LLAMA_8B, "cuda", "bfloat16", 2, 2048, ["memory-saving"], steps=6),
    "gpu-8b-longctx": Preset(LLAMA_8B, "cuda", "bfloat16", 1, 4096, ["memory-saving"], extra={"budget_gib": 24}),
    "cpu-packing": Preset(Shape(512, 1376, 4, 8, 2, 8192), "cpu", "float32", 4, 512, ["no-recompute"], steps=6),
    # SmolLM2-135M-Instruct (--model): micro-batch 8 x 256 tokens, NF4, float32 compute; a step is ~half a minute
    "cpu-smollm2": Preset(None, "cpu", "float32", 8, 256, ["no-recompute"], steps=3, warmup=1),
}


# ---------------------------------------------------------------------------------------------
# the model both stacks load


COMPLETE = ".complete"  # written last: a folder without it (a run cut short while saving) is never reused


def build_base(shape: Shape, folder: Path) -> Path:
    """A random-init Llama-shaped model saved as bf16 safetensors, built on the GPU where there is one (an 8B
    random init takes minutes on a CPU), written beside ``folder`` and renamed into place, then marked complete.
    Reused only when the completion marker is there; anything else at ``folder`` is removed and rebuilt."""
    import shutil

    if (folder / COMPLETE).exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora_cli.model.loading import quiet_libraries
    from qlora_cli.testing.tiny import build_char_tokenizer

    quiet_libraries()
    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tie,
        max_position_embeddings=131072,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB")
    build_char_tokenizer().save_pretrained(tmp)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    (tmp / COMPLETE).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    os.replace(tmp, folder)
    return folder


MODEL: str | None = None  # --model, passed on to the memory workers
DATA = "full"  # "full": every token is a target; "instruct": the first half of each row is an untrained prompt


VOCAB: int | None = None  # a real model's vocabulary size (--model)


def token_batch(preset: Preset, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, VOCAB or preset.shape.vocab, (preset.micro_batch, seq), generator=g)
    labels = ids.clone()
    if DATA == "instruct":  # supervised fine-tuning: loss on the response only (train_on_inputs: false)
        labels[:, : seq // 2] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------------------------------------
# the stacks: each returns a step function running one optimizer step on the batch


def setup_qlora(folder: Path, preset: Preset, mode: str, dora: bool = False) -> Any:
    from qlora_cli.config import load_config
    from qlora_cli.kernels.liger import apply_liger
    from qlora_cli.model.loading import enable_gradient_checkpointing, load_base_model
    from qlora_cli.model.lora import inject_lora, lora_parameters, set_fused
    from qlora_cli.train.loop import build_optimizer
    from qlora_cli.train.loss import loss_sum
    from qlora_cli.train.step import Precision, clip_gradients

    recompute = "offload" if (mode == "memory-saving" and preset.device == "cuda") else mode == "memory-saving"
    cfg = load_config(
        None,
        base_model=str(folder),
        datasets=[{"path": "unused"}],
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,  # as PEFT's reference recipe
        lora_target_modules="all-linear",
        bnb_4bit_compute_dtype=preset.dtype,
        optimizer="paged_adamw_8bit",
        gradient_checkpointing=recompute,
        device=preset.device,
        use_dora=dora,
    )
    device = torch.device(preset.device)
    model = load_base_model(cfg, device)
    inject_lora(model, cfg.lora)
    set_fused(model, True)
    liger = apply_liger(model, cfg.liger_kernels)  # as `qlora train` does: on a GPU where Liger imports
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.gradient_checkpointing == "offload", cfg.checkpoint_every_n_layers)
    model.train()
    params = lora_parameters(model)
    opt = build_optimizer(cfg, params)
    precision = Precision.for_run(preset.dtype, device)

    def step(batch: dict[str, torch.Tensor]) -> float:
        with precision.autocast():
            s, n = loss_sum(model, batch, fused=True)
        (s / n).backward()
        clip_gradients(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(s.detach()) / n

    step.optimizer, step.liger = opt, liger
    return step


def setup_peft(folder: Path, preset: Preset, mode: str, dora: bool = False) -> Any:
    """PEFT's reference recipe (issue 13): the bnb 4-bit model (NF4, double quant, compute and load dtype the
    preset's), ``get_peft_model`` with LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
    lora_dropout=0.0) and no ``prepare_model_for_kbit_training`` (it upcasts embeddings and head to float32:
    slower and heavier than PEFT run plainly), non-reentrant checkpointing in memory-saving mode, autocast
    around the forward, the model's own loss, paged AdamW 8-bit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_cli.model.loading import enable_gradient_checkpointing

    dtype = getattr(torch, preset.dtype)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=dtype, device_map={"": torch.device(preset.device)}
    )
    model.config.use_cache = False
    if mode == "memory-saving":  # transformers' own non-reentrant checkpointing (whatever its 5.x method name)
        enable_gradient_checkpointing(model)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM", use_dora=dora
        ),
    )
    model.train()
    return hf_loss_step(model, preset.device, dtype if dtype != torch.float32 else None)


def setup_unsloth(folder: Path, preset: Preset, mode: str) -> Any:
    from unsloth import FastLanguageModel  # noqa: F401  (optional peer)

    model, _ = FastLanguageModel.from_pretrained(
        str(folder), max_seq_length=preset.seq, load_in_4bit=True, dtype=getattr(torch, preset.dtype)
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth" if mode == "memory-saving" else False,
    )
    return hf_loss_step(model, preset.device, None)


def hf_loss_step(model: Any, device: str, autocast_dtype: torch.dtype | None) -> Any:
    """The peers' step: the model's own loss, backward, clipping, paged 8-bit AdamW on the trainable weights."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.0)

    def step(batch: dict[str, torch.Tensor]) -> float:
        with torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step.optimizer = opt
    return step


STACKS = {
    "qlora": setup_qlora,
    "peft": setup_peft,
    "unsloth": setup_unsloth,
    # --dora: DoRA (use_dora) beside plain LoRA, each stack's
    "qlora-dora": partial(setup_qlora, dora=True),
    "peft-dora": partial(setup_peft, dora=True),
}


def available_stacks() -> list[str]:
    stacks = ["qlora", "peft"]
    try:
        import unsloth  # noqa: F401

        stacks.append("unsloth")
    except Exception:  # unsloth is optional and may fail to import on unsupported machines
        pass
    return stacks


# ---------------------------------------------------------------------------------------------
# measurement


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_alternating(folder: Path, preset: Preset, mode: str, stacks: list[str], seq: int) -> dict[str, dict]:
    """Median step time of each stack, stepping them in turn after a warm-up."""
    steps = {name: STACKS[name](folder, preset, mode) for name in stacks}
    batch = token_batch(preset, seq, torch.device(preset.device))
    times: dict[str, list[float]] = {name: [] for name in stacks}
    losses: dict[str, list[float]] = {name: [] for name in stacks}
    for i in range(preset.warmup + preset.steps):
        for name in stacks:
            sync(preset.device)
            t0 = time.perf_counter()
            losses[name].append(steps[name](batch))
            sync(preset.device)
            if i >= preset.warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = preset.micro_batch * seq
    return {
        name: {
            "median_step_sec": statistics.median(t),
            "tokens_per_sec": tokens / statistics.median(t),
            "step_secs": t,
            "first_loss": losses[name][0],
        }
        for name, t in times.items()
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(folder: Path, preset: Preset, mode: str, stack: str, seq: int) -> dict:
    """Run in a fresh process: peak memory of a few training steps of one stack."""
    device = preset.device
    baseline = _rss_bytes()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    step = STACKS[stack](folder, preset, mode)
    batch = token_batch(preset, seq, torch.device(device))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
            torch.cuda.reset_peak_host_memory_stats()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(3):
            step(batch)
        sync(device)
    finally:
        stop.set()
        sampler.join()
    if device == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(), **host_memory(step)}
    return {"peak_bytes": peak[0] - baseline}


def host_memory(step: Any) -> dict[str, int | None]:
    """What a GPU memory figure leaves out: pinned host memory (torch's pinned allocator: offloaded checkpoint
    inputs) at its peak, and the optimizer state bitsandbytes pages (unified memory, which
    ``max_memory_allocated`` never sees and the driver moves to the host under pressure)."""
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    pinned = stats.get("allocated_bytes.peak", stats.get("allocated_bytes.all.peak"))
    opt = getattr(step, "optimizer", None)
    paged = getattr(getattr(opt, "page_mng", None), "paged_tensors", None)
    paged_bytes = sum(t.numel() * t.element_size() for t in paged) if paged is not None else None
    return {"pinned_host_peak_bytes": pinned, "paged_optimizer_bytes": paged_bytes}


def measure_memory(folder: Path, preset_name: str, mode: str, stack: str, seq: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--preset",
        preset_name,
        "--memory-worker",
        stack,
        "--mode",
        mode,
        "--seq",
        str(seq),
        "--model-dir",
        str(folder),
        "--data",
        DATA,
    ]
    if MODEL:
        cmd += ["--model", MODEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  memory run of {stack} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {"peak_bytes": None}
    return json.loads(lines[-1])


def planned_longest(folder: Path, preset: Preset, budget_gib: float) -> int:
    """The longest sequence ``qlora inspect``'s memory plan says fits ``budget_gib`` (micro-batch 1, the
    memory-saving mode setup_qlora trains in): the plan at two lengths, solved for the budget (the step peak is
    affine in the length with flash attention). 8192 when the plan cannot say."""
    from qlora_cli.config import load_config
    from qlora_cli.memory_plan import plan_memory
    from qlora_cli.memory_plan.sizes import load_model_config

    def total(seq: int) -> int:
        cfg = load_config(
            None, base_model=str(folder), datasets=[{"path": "unused"}], lora_r=16, lora_alpha=32, lora_dropout=0.0,
            lora_target_modules="all-linear", bnb_4bit_compute_dtype=preset.dtype, optimizer="paged_adamw_8bit",
            gradient_checkpointing="offload", micro_batch_size=1, sequence_len=seq,
        )  # fmt: skip
        return plan_memory(cfg, load_model_config(cfg), device_type="cuda", search_batch=False).total

    try:
        a, b = total(8192), total(16384)
    except Exception as e:  # noqa: BLE001 - the plan is a starting point, not a requirement
        print(f"memory plan failed ({type(e).__name__}: {e}); starting the search at 8192", file=sys.stderr)
        return 8192
    per_token = max((b - a) / 8192, 1.0)
    return max(1024, int(8192 + (budget_gib * 2**30 - a) / per_token) // 512 * 512)


def longest_sequences(folder: Path, preset: Preset, stacks: list[str], budget_gib: float, out: dict) -> None:
    """The longest sequence each stack trains one step of within ``budget_gib`` of GPU memory, all in this one
    process (each stack loaded once). Only ``torch.OutOfMemoryError`` counts as "does not fit": any other error
    ends the search with that error, never as a length of 0. The search starts where qlora's memory plan says
    the limit is, steps up by 1/8 while it fits (or halves while it does not), then bisects to 512 tokens.
    The budget is torch's allocator limit (``set_per_process_memory_fraction``); bitsandbytes' paged optimizer
    state and the CUDA context are outside it. ``out`` is filled as it goes (the caller writes it)."""
    import gc

    torch.cuda.set_per_process_memory_fraction(budget_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    start = planned_longest(folder, preset, budget_gib)
    out["plan_start"] = start
    print(f"memory plan: about {start:,} tokens fit in {budget_gib:g} GiB (qlora, micro-batch 1); searching from there")
    for stack in stacks:
        out["longest_sequence"][stack], out["tried"][stack] = _longest_for(stack, folder, preset, start)
        gc.collect()
        torch.cuda.empty_cache()


def _longest_for(stack: str, folder: Path, preset: Preset, start: int) -> tuple[int, dict[int, bool]]:
    import gc

    step = STACKS[stack](folder, preset, "memory-saving")
    tried: dict[int, bool] = {}

    def fits(seq: int) -> bool:
        oom = False
        try:
            step(token_batch(preset, seq, torch.device("cuda")))
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            oom = True
        step.optimizer.zero_grad(set_to_none=True)  # a backward cut short leaves partial gradients
        gc.collect()  # after the except block: the traceback no longer holds the step's tensors
        torch.cuda.empty_cache()
        tried[seq] = not oom
        print(f"  {stack:8s} {seq:>7,} tokens: {'fits' if not oom else 'out of memory'}", flush=True)
        return not oom

    return _search(fits, start), tried


def _search(fits: Any, start: int, grain: int = 512, cap: int = 262_144) -> int:
    lo, hi = 0, None
    seq = max(grain, start // grain * grain)
    if fits(seq):
        lo = seq
        while hi is None:  # up by 1/8 from a plan that is close
            nxt = min(cap, (lo + max(grain, lo // 8)) // grain * grain)
            if nxt <= lo:
                return lo
            lo, hi = (nxt, None) if fits(nxt) else (lo, nxt)
    else:
        hi = seq
        while lo == 0:  # down by halves: PEFT's limit may be far below qlora's plan
            nxt = hi // 2 // grain * grain
            if nxt < grain:
                return 0
            lo, hi = (nxt, hi) if fits(nxt) else (0, nxt)
    while hi - lo > grain:
        mid = (lo + hi) // 2 // grain * grain
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def real_model_folder(name: str) -> Path:
    """A model folder both stacks can load: the folder itself, or a GGUF file converted (once) to float32."""
    from qlora_cli.model.gguf import gguf_folder, is_gguf

    return gguf_folder(name, "float32") if is_gguf(name) else Path(name).expanduser()


def model_flops_per_step(folder: Path, preset: Preset, seq: int, lora_r: int = 16) -> float:
    """FLOPs of one LoRA training step (see the module's docstring), counted on the model's own shapes. The output
    head counts only at positions that predict a target: the work the loss needs (with ``--data instruct`` half the
    positions have no target; a stack that computes logits there does work this count does not credit)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    body = sum(m.in_features * m.out_features for m in linear)
    lora = sum(lora_r * (m.in_features + m.out_features) for m in linear)
    tokens = preset.micro_batch * seq
    labels = token_batch(preset, seq, torch.device("cpu"))["labels"]
    targets = int((labels[:, 1:] != -100).sum())
    attention = 12 * config.num_hidden_layers * tokens * seq * config.hidden_size
    return 4 * body * tokens + 4 * head.in_features * head.out_features * targets + 6 * lora * tokens + attention


def gemm_rate(folder: Path, preset: Preset, seq: int, seconds: float = 3.0) -> dict[str, float]:
    """This machine's fp32 matmul rate (FLOP/s) on the model's main shapes, tokens x hidden x intermediate and
    tokens x hidden x hidden: the best of a few timed repeats of each, after a warm-up."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    tokens, hidden = preset.micro_batch * seq, config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    rates = {}
    for name, (m, k, n) in {
        "up": (tokens, hidden, inter),
        "down": (tokens, inter, hidden),
        "square": (tokens, hidden, hidden),
    }.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * m * k * n / best
    return rates


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "bitsandbytes", "peft", "accelerate", "unsloth"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    return out


def hardware(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch using {torch.get_num_threads()}"


def run_packing(folder: Path, preset: Preset) -> dict:
    """qlora tokens/s (real, non-pad tokens) with and without packing on Alpaca-like example lengths."""
    import random

    from qlora_cli.config import load_config
    from qlora_cli.data.pipeline import Example, collate, collate_packed, pack_examples
    from qlora_cli.model.loading import load_base_model
    from qlora_cli.model.lora import inject_lora, lora_parameters, set_fused
    from qlora_cli.train.loop import build_optimizer
    from qlora_cli.train.loss import loss_sum

    rng = random.Random(0)
    # Alpaca's tokenized lengths are roughly log-normal around ~150 tokens with a long tail
    lengths = [min(preset.seq, max(16, int(rng.lognormvariate(4.9, 0.6)))) for _ in range(256)]
    examples = [
        Example([rng.randrange(10, preset.shape.vocab) for _ in range(n)], [-100] * (n // 3) + [1] * (n - n // 3))
        for n in lengths
    ]
    for e in examples:
        e.labels = [t if lab == 1 else -100 for t, lab in zip(e.input_ids, e.labels)]
    cfg = load_config(
        None,
        base_model=str(folder),
        datasets=[{"path": "unused"}],
        lora_target_modules="all-linear",
        bnb_4bit_compute_dtype=preset.dtype,
        device=preset.device,
        gradient_checkpointing=False,
    )
    model = load_base_model(cfg, torch.device(preset.device))
    inject_lora(model, cfg.lora)
    set_fused(model, True)
    model.train()
    opt = build_optimizer(cfg, lora_parameters(model))
    packs = [[examples[i] for i in p] for p in pack_examples(examples, preset.seq)]
    plain = [examples[i : i + preset.micro_batch] for i in range(0, len(examples), preset.micro_batch)]
    packed = [packs[i : i + preset.micro_batch] for i in range(0, len(packs), preset.micro_batch)]
    result = {}
    for name, batches, make in (
        ("padded", plain, lambda b: collate(b, 0)),
        ("packed", packed, lambda b: collate_packed(b, 0)),
    ):
        real = 0
        t0 = time.perf_counter()
        for b in batches[: preset.steps * 2]:
            batch = make(b)
            mask = batch.pop("token_mask", batch.get("attention_mask"))
            real += int(mask.sum())
            s, n = loss_sum(model, batch, fused=True)
            (s / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        result[name] = {"real_tokens_per_sec": real / (time.perf_counter() - t0)}
    result["packed_vs_padded"] = result["packed"]["real_tokens_per_sec"] / result["padded"]["real_tokens_per_sec"]
    result["packing_efficiency"] = sum(lengths) / (len(packs) * preset.seq)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS))
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--model-dir", type=Path, default=None, help="where the random base model is saved")
    ap.add_argument("--model", default=None, help="a real model folder or GGUF file instead of a random one")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument(
        "--data",
        choices=["full", "instruct"],
        default="full",
        help="full: every token a target (the reference table's setting); instruct: half of each row "
        "is a prompt without loss, as in supervised fine-tuning",
    )
    ap.add_argument("--dora", action="store_true", help="also DoRA (use_dora) in qlora and in PEFT, side by side")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    global DATA, MODEL
    DATA, MODEL = args.data, args.model
    if args.steps:
        preset.steps = args.steps
    torch.set_num_threads(torch.get_num_threads())
    from qlora_cli.model.loading import quiet_libraries

    quiet_libraries()
    if preset.shape is None and not args.model:
        print(f"preset {args.preset} needs --model (a model folder or GGUF file)", file=sys.stderr)
        return 2
    if args.model:
        folder = real_model_folder(args.model)
        from transformers import AutoConfig

        global VOCAB
        VOCAB = AutoConfig.from_pretrained(folder).vocab_size
    else:
        folder = args.model_dir or Path(os.environ.get("QLORA_BENCH_DIR", "/tmp/qlora-bench")) / (
            f"llama-{preset.shape.hidden}x{preset.shape.layers}-v{preset.shape.vocab}"
        )

    if args.memory_worker:  # child process: one stack's peak memory
        print(json.dumps(memory_worker(folder, preset, args.mode, args.memory_worker, args.seq)))
        return 0
    if preset.device == "cuda" and not torch.cuda.is_available():
        print(f"preset {args.preset} needs a CUDA GPU", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    if preset.shape is not None and not args.model:
        build_base(preset.shape, folder)
    report: dict[str, Any] = {
        "preset": args.preset,
        "preset_settings": asdict(preset),
        "hardware": hardware(preset.device),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "modes": {},
    }
    if args.model:
        report["model"] = args.model
    stacks = available_stacks()
    if args.dora:
        stacks = ["qlora", "peft", "qlora-dora", "peft-dora"]
    summary = None
    if args.preset == "cpu-packing":
        res = run_packing(folder, preset)
        report["packing"] = res
        print(
            f"padded {res['padded']['real_tokens_per_sec']:,.0f} tok/s  packed {res['packed']['real_tokens_per_sec']:,.0f}"
            f" tok/s  (efficiency {res['packing_efficiency']:.1%})"
        )
        summary = f"packed_vs_padded={res['packed_vs_padded']:.2f}"
    elif args.preset == "gpu-8b-longctx":
        budget = preset.extra["budget_gib"]
        found: dict[str, Any] = {"longest_sequence": {}, "tried": {}}
        report["longctx"] = found
        try:
            longest_sequences(folder, preset, stacks, budget, found)
        finally:  # whatever was found is kept, also when a stack fails with something other than OOM
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
        lengths = found["longest_sequence"]
        for s, n in lengths.items():
            print(f"{s:8s} longest trainable sequence in {budget:g} GiB: {n:,} tokens")
        summary = f"longctx_vs_peft={lengths['qlora'] / max(lengths['peft'], 1):.2f}"
    else:
        for mode in preset.modes:
            speed = time_alternating(folder, preset, mode, stacks, preset.seq)
            for s in stacks:
                speed[s].update(measure_memory(folder, args.preset, mode, s, preset.seq))
            report["modes"][mode] = speed
            base = speed["peft"]
            print(
                f"\n{args.preset} / {mode}: micro-batch {preset.micro_batch} x seq {preset.seq}, {preset.dtype}, "
                f"{DATA} targets"
            )
            gpu = preset.device == "cuda"
            host = f" {'pinned MiB':>10s} {'paged MiB':>9s}" if gpu else ""
            print(f"{'stack':8s} {'tokens/s':>10s} {'vs peft':>8s} {'peak MiB':>10s} {'vs peft':>8s}{host}")
            for s in stacks:
                r = speed[s]
                mem = r["peak_bytes"]
                ratio_m = (mem / base["peak_bytes"]) if (mem and base["peak_bytes"]) else float("nan")
                r["speedup_vs_peft"] = r["tokens_per_sec"] / base["tokens_per_sec"]
                r["memory_vs_peft"] = ratio_m
                moved = ""
                if gpu:  # bytes a GPU figure does not hold: said beside it, never left out
                    mib = [r.get(k) for k in ("pinned_host_peak_bytes", "paged_optimizer_bytes")]
                    moved = "".join(
                        f" {'n/a' if v is None else f'{v / 2**20:,.0f}':>{w}s}" for v, w in zip(mib, (10, 9))
                    )
                print(
                    f"{s:8s} {r['tokens_per_sec']:10,.0f} {r['speedup_vs_peft']:7.2f}x "
                    f"{(mem or 0) / 2**20:10,.0f} {ratio_m:7.2f}x{moved}"
                )
            for s in stacks:  # each step beside PEFT's next one: the spread one run of the ratio shows
                if s != "peft":
                    pairs = [p / q for q, p in zip(speed[s]["step_secs"], base["step_secs"])]
                    speed[s]["speedup_per_step_pair"] = pairs
                    print(f"{s:8s} vs peft, step by step: {min(pairs):.2f}x-{max(pairs):.2f}x over {len(pairs)} pairs")
            ref = PEFT_REFERENCE.get((args.preset, mode))
            if ref is not None and not args.model and DATA == "full":
                report["modes"][mode]["peft_reference"] = {"tokens_per_sec": ref[0], "peak_gib": ref[1]}
                peak = base["peak_bytes"]
                print(
                    f"PEFT here: {base['tokens_per_sec']:,.0f} tokens/s at "
                    f"{'n/a' if peak is None else f'{peak / 2**30:.1f}'} GiB; the issue's reference for this recipe "
                    f"(H200, torch 2.11, transformers 5.17): {ref[0]:,} tokens/s at {ref[1]} GiB"
                )
            if args.json:  # as it goes: a run cut short keeps the modes it measured
                args.json.write_text(json.dumps(report, indent=2))
            if args.model and preset.device == "cpu":
                flops = model_flops_per_step(folder, preset, preset.seq)
                rates = gemm_rate(folder, preset, preset.seq)
                limit = max(rates.values())
                report["gemm_flops_per_sec"], report["model_flops_per_step"] = rates, flops
                print(f"fp32 GEMM here: {', '.join(f'{k} {v / 1e9:.1f}' for k, v in rates.items())} GFLOP/s")
                for s in stacks:
                    r = speed[s]
                    r["model_flops_per_sec"] = flops / r["median_step_sec"]
                    r["fraction_of_gemm_rate"] = r["model_flops_per_sec"] / limit
                    print(f"{s:8s} {r['model_flops_per_sec'] / 1e9:6.1f} GFLOP/s = {r['fraction_of_gemm_rate']:.0%} "
                          "of the best GEMM rate")  # fmt: skip
            if summary is None:
                q = speed["qlora"]
                summary = f"speedup_vs_peft={q['speedup_vs_peft']:.2f} memory_vs_peft={q['memory_vs_peft']:.2f}"
                if args.dora:
                    d, pd = speed["qlora-dora"], speed["peft-dora"]
                    summary += (
                        f" dora_speedup_vs_peft_dora={d['tokens_per_sec'] / pd['tokens_per_sec']:.2f}"
                        f" dora_memory_vs_peft_dora={d['peak_bytes'] / pd['peak_bytes']:.2f}"
                        f" dora_speed_vs_qlora_lora={d['tokens_per_sec'] / q['tokens_per_sec']:.2f}"
                        f" dora_memory_vs_qlora_lora={d['peak_bytes'] / q['peak_bytes']:.2f}"
                    )
                if "fraction_of_gemm_rate" in q:
                    summary += f" fraction_of_gemm_rate={q['fraction_of_gemm_rate']:.2f}"
    report["wall_sec"] = time.perf_counter() - t_start
    print(f"wall time of the whole benchmark: {report['wall_sec']:.1f}s (a whole run per stack, start to exit: "
          "scripts/bench_overhead.py)")  # fmt: skip
    print(f"hardware: {report['hardware']}; versions: {report['versions']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
