"""DPO step: qlora against TRL's DPOTrainer on PEFT + bitsandbytes, side by side in one run.

    python scripts/bench_dpo.py --preset cpu-tiny
    python scripts/bench_dpo.py --preset cpu-smollm2 --model models/SmolLM2-135M-Instruct.Q4_1.gguf

Both stacks load the same NF4 base (double quantization, float32 compute on CPU), LoRA r=16 alpha=32 on every
linear layer, and run the same batch of pairs (random prompt tokens + two random responses), one optimizer step at
a time (the loss, backward, clipping at 1.0, paged 8-bit AdamW):

- qlora: its DPO micro-batch (``train.preference.micro_batch_loss``): chosen and rejected in one batch, the
  reference forward with the LoRA layers switched off, fused LoRA layers and head + loss on response positions.
- TRL: ``DPOTrainer(model, peft_config=...)``'s own ``compute_loss`` on the model it wraps (its recipe for a new
  adapter: the reference is the base with the adapter disabled). TRL casts a 4-bit model's adapter to bfloat16;
  on the CPU presets it is put back in float32 (bfloat16 matmuls are several times slower on CPU), so both train
  float32 adapters.

Speed: median step time over alternating steps after a warm-up. Memory: peak RSS above the interpreter's own of
three steps, each stack in a fresh process. Prints one JSON line per stack and `speedup_vs_trl=X.XX
memory_vs_trl=Y.YY`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import Shape, _rss_bytes, build_base, real_model_folder  # noqa: E402


@dataclass
class Preset:
    shape: Shape | None  # None: a real model, named with --model
    pairs: int  # pairs per micro-batch: 2x this many sequences
    prompt: int  # prompt tokens
    response: int  # tokens of each response
    steps: int = 6
    warmup: int = 2


PRESETS = {
    "cpu-tiny": Preset(Shape(512, 1376, 4, 8, 2, 8192), pairs=4, prompt=128, response=128, steps=10),
    "cpu-smollm2": Preset(None, pairs=4, prompt=128, response=128, steps=3, warmup=1),
}
BETA = 0.1


def base_folder(preset: Preset, model: str | None) -> Path:
    """The model both stacks load: ``make bench``'s random Llama-shaped folder, or the real model named."""
    if preset.shape is None:
        if not model:
            sys.exit("error: this preset needs --model (a GGUF file or model folder)")
        return real_model_folder(model)
    shape = preset.shape
    bench_dir = Path(os.environ.get("QLORA_BENCH_DIR", "/tmp/qlora-bench"))
    return build_base(shape, bench_dir / f"llama-{shape.hidden}x{shape.layers}-v{shape.vocab}")


def vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def pair_tensors(preset: Preset, vocab: int) -> tuple[torch.Tensor, int]:
    """(2B, P + R) token ids, chosen rows then rejected rows, and the prompt length."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, vocab, (preset.pairs, preset.prompt), generator=g)
    chosen = torch.randint(10, vocab, (preset.pairs, preset.response), generator=g)
    rejected = torch.randint(10, vocab, (preset.pairs, preset.response), generator=g)
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    return ids, preset.prompt


def optimizer(params: list[torch.nn.Parameter]) -> Any:
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, lr=1e-5, weight_decay=0.0)


def setup_qlora(folder: Path, preset: Preset) -> Any:
    from qlora_cli.config import load_config
    from qlora_cli.data.pipeline import IGNORE_INDEX, Example
    from qlora_cli.model.loading import load_base_model, quiet_libraries
    from qlora_cli.model.lora import inject_lora, lora_parameters, set_fused
    from qlora_cli.train.preference import Objective, micro_batch_loss

    quiet_libraries()
    cfg = load_config(
        None, base_model=str(folder), datasets=[{"path": "x", "type": "preference"}], method="dpo", beta=BETA,
        bnb_4bit_compute_dtype="float32", lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules="all-linear",
    )  # fmt: skip
    model = load_base_model(cfg, torch.device("cpu"))
    inject_lora(model, cfg.lora)
    set_fused(model, True)
    model.train()
    params = lora_parameters(model)
    opt = optimizer(params)
    ids, p = pair_tensors(preset, vocab_size(folder))
    n = preset.pairs
    rows = []
    for i in range(n):
        chosen, rejected = ids[i].tolist(), ids[n + i].tolist()
        ex = Example(chosen, [IGNORE_INDEX] * p + chosen[p:], prompt_len=p)
        ex.rejected = Example(rejected, [IGNORE_INDEX] * p + rejected[p:], prompt_len=p)
        rows.append([ex])
    objective = Objective.from_config(cfg)

    def step() -> float:
        loss, _ = micro_batch_loss(model, rows, objective, device=torch.device("cpu"), pad_id=0, fused=True,
                                   item_scale=1 / n)  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def setup_trl(folder: Path, preset: Preset) -> Any:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from qlora_cli.model.loading import disable_cpu_weight_repacking, quiet_libraries

    quiet_libraries()
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"}
    )
    model.config.use_cache = False
    disable_cpu_weight_repacking(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), beta=BETA, use_cpu=True, bf16=False, report_to=[],
        gradient_checkpointing=False, per_device_train_batch_size=preset.pairs, max_length=None,
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    peft_model = trainer.model
    for p in peft_model.parameters():  # TRL's bfloat16 cast of a 4-bit model's adapter, undone on the CPU
        if p.requires_grad:
            p.data = p.data.float()
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = optimizer(params)
    ids, p = pair_tensors(preset, vocab_size(folder))
    completion = torch.zeros_like(ids)
    completion[:, p:] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}

    def step() -> float:
        loss = trainer.compute_loss(peft_model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


STACKS = {"qlora": setup_qlora, "trl": setup_trl}


def timed(folder: Path, preset: Preset) -> dict[str, dict]:
    steps = {name: setup(folder, preset) for name, setup in STACKS.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    first: dict[str, float] = {}
    for i in range(preset.warmup + preset.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            loss = step()
            if i == 0:
                first[name] = loss
            if i >= preset.warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = 2 * preset.pairs * (preset.prompt + preset.response)
    return {
        n: {
            "median_step_sec": statistics.median(t),
            "tokens_per_sec": tokens / statistics.median(t),
            "first_loss": first[n],
        }
        for n, t in times.items()
    }


def memory_worker(folder: Path, preset: Preset, stack: str) -> int:
    baseline = _rss_bytes()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    step = STACKS[stack](folder, preset)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(3):
            step()
    finally:
        stop.set()
        sampler.join()
    return peak[0] - baseline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu-tiny")
    ap.add_argument("--model", help="cpu-smollm2: a GGUF file or model folder")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    folder = base_folder(preset, args.model)
    if args.memory_worker:
        print(json.dumps({"peak_bytes": memory_worker(folder, preset, args.memory_worker)}))
        return
    speed = timed(folder, preset)
    for stack in STACKS:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--memory-worker", stack]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        speed[stack]["peak_gib"] = json.loads(out)["peak_bytes"] / 2**30
        print(json.dumps({"preset": args.preset, "stack": stack, **speed[stack]}))
    q, t = speed["qlora"], speed["trl"]
    print(
        f"speedup_vs_trl={q['tokens_per_sec'] / t['tokens_per_sec']:.2f} memory_vs_trl={q['peak_gib'] / t['peak_gib']:.2f}"
    )


if __name__ == "__main__":
    main()
