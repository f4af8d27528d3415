"""A whole run, start to exit: `qlora train` against a plain PEFT + bitsandbytes loop, side by side.

Each stack runs as its own process, as a user would start it, on the same tiny random Llama and the same rows
(upper-case a word: prompt masked, answer trained), NF4 + double quantization, float32 compute, LoRA r=16 on all
linear layers, paged 8-bit AdamW, micro-batch 32, sequences cut at 64 tokens, 200 steps. The plain loop is what a
user writes from the PEFT docs: tokenizer, 4-bit model, `get_peft_model`, padded batches, backward, clipping at 1.0
(as TRL and the HF Trainer do by default, and qlora), step, save. The cache of tokenized rows (`QLORA_CACHE`) starts
empty, so qlora's first round tokenizes; later rounds read it, as a second run of a config does.

Reported per stack: wall time of the process (launch to exit), time to the first step (launch to the first step's
start), the steps themselves, time after the last step (its end to exit). qlora reads its own first and last step
times from `metrics.jsonl`; the loop prints them. Stacks alternate (qlora, PEFT, qlora, ...); medians.

    OMP_NUM_THREADS=1 python scripts/bench_overhead.py                     # the tiny model, 3 rounds
    OMP_NUM_THREADS=1 python scripts/bench_overhead.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_peft_loop(args: argparse.Namespace) -> None:
    """The peer's plain loop, in this process (run by the benchmark as ``--peft-loop``)."""
    import random

    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=quant, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    examples = []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        answer = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + answer)[: args.seq]
        examples.append((ids, ([-100] * len(prompt) + answer)[: args.seq]))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(trained, lr=2e-4)
    model.train()
    rng = random.Random(0)
    first = None
    for _ in range(args.steps):
        batch = rng.sample(examples, args.batch)
        width = max(len(ids) for ids, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        if first is None:
            first = time.time()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)  # as TRL and the HF Trainer do by default (and qlora)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    last = time.time()
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(json.dumps({"first_step_at": first, "last_step_at": last, "loss": float(loss)}))


def timed_process(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[float, float, str]:
    """(launch time, exit time, stdout) of one process."""
    start = time.time()
    ran = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    end = time.time()
    if ran.returncode:
        sys.exit(f"{cmd[:4]} failed:\n{ran.stderr[-3000:]}")
    return start, end, ran.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a base model folder or GGUF file; default: a tiny random Llama")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--qlora-root", default=str(ROOT), help="run qlora from this checkout (an earlier commit)")
    ap.add_argument("--peft-loop", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peft_loop:
        plain_peft_loop(args)
        return

    import peft
    import torch
    import transformers

    from qlora_cli.testing.tiny import build_tiny_model
    from tests.conftest import upper_rows, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    model_dir = Path(args.model) if args.model else build_tiny_model(tmp / "base", "llama")
    if model_dir.suffix == ".gguf":  # both stacks load the same float32 folder: qlora's GGUF reader is not timed
        from qlora_cli.model.gguf import gguf_folder

        model_dir = Path(gguf_folder(str(model_dir), "float32"))
    data = write_jsonl(tmp / "rows.jsonl", upper_rows(args.rows, seed=5))
    env = {**os.environ, "QLORA_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
    cfg = {
        "base_model": str(model_dir), "datasets": [{"path": str(data)}], "bnb_4bit_compute_dtype": "float32",
        "micro_batch_size": args.batch, "sequence_len": args.seq, "max_steps": args.steps, "lora_r": 16,
        "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": "all-linear", "learning_rate": 2e-4,
        "device": "cpu", "gradient_checkpointing": False, "logging_steps": 10,
    }  # fmt: skip
    times: dict[str, dict[str, list[float]]] = {"qlora": {}, "peft": {}}

    def note(stack: str, start: float, end: float, first: float, last: float) -> None:
        for key, value in (("wall", end - start), ("to_first_step", first - start), ("steps", last - first),
                           ("after_last_step", end - last)):  # fmt: skip
            times[stack].setdefault(key, []).append(value)
        print(f"{stack:5s} wall {end - start:6.2f}s  to first step {first - start:5.2f}s  steps {last - first:6.2f}s"
              f"  after last step {end - last:5.2f}s", flush=True)  # fmt: skip

    for k in range(args.rounds):
        out = tmp / f"qlora-{k}"
        (tmp / "run.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
        qlora_env = {**env, "PYTHONPATH": args.qlora_root}
        start, end, _ = timed_process(
            [sys.executable, "-m", "qlora_cli", "train", str(tmp / "run.yaml")], qlora_env, Path(args.qlora_root)
        )
        summary = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        note("qlora", start, end, summary["first_step_at"], summary["last_step_at"])
        loop = [sys.executable, __file__, "--peft-loop", "--model-dir", str(model_dir), "--data", str(data),
                "--out", str(tmp / f"peft-{k}"), "--steps", str(args.steps), "--batch", str(args.batch),
                "--seq", str(args.seq)]  # fmt: skip
        start, end, stdout = timed_process(loop, env)
        stamps = json.loads(stdout.strip().splitlines()[-1])
        note("peft", start, end, stamps["first_step_at"], stamps["last_step_at"])

    medians = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
    print(
        f"# {time.strftime('%Y-%m-%d')}  {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
        f"  torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}"
    )
    print(f"# {model_dir.name}: {args.steps} steps of {args.batch} x <= {args.seq} tokens; medians of {args.rounds}")
    print(f"{'':6s} {'wall':>8s} {'to first':>9s} {'steps':>8s} {'after last':>11s}")
    for stack, m in medians.items():
        print(
            f"{stack:6s} {m['wall']:7.2f}s {m['to_first_step']:8.2f}s {m['steps']:7.2f}s {m['after_last_step']:10.2f}s"
        )
    ratio = medians["qlora"]["wall"] / medians["peft"]["wall"]
    print(f"qlora_wall_vs_peft={ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": medians, "runs": times, "wall_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
