"""Streaming against reading the whole file: peak memory (RSS) and time to the first training step of `qlora train`
on one generated JSONL file, each run in its own process, side by side.

    python scripts/bench_stream.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf [--mb 2000] [--steps 2]
        [--modes stream whole]

The file holds Alpaca-like rows (instruction, input, output) up to --mb megabytes; both runs train the same model
for --steps steps with the tokenization cache off (a first run), sequence_len 256, batch 4. `whole` is the default
reader (every row read and tokenized before the first step); `stream` is `streaming: true` (a pass that checks
every line, then blocks of 10,000 rows). Prints one JSON line per mode: peak RSS of the training process (its own
`ru_maxrss`), seconds from process start to the first step's log line, and to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the model data train answer question explain write list give short long python code function value "
    "number text city river history science because which about there would their other"
).split()

CHILD = """
import resource, sys, json
from rich.console import Console
from qlora_cli.config import load_config
from qlora_cli.train.loop import run_train
cfg = load_config(sys.argv[1])
run_train(cfg, console=Console(stderr=True, soft_wrap=True, force_terminal=False))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_rows(path: Path, megabytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    limit, n = megabytes * 1_000_000, 0
    with path.open("w") as f:
        while f.tell() < limit:
            row = {"instruction": sentence(6, 20), "input": sentence(0, 30) if rng.random() < 0.4 else "",
                   "output": sentence(20, 120)}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def run_mode(mode: str, model: str, data: Path, steps: int, root: Path) -> dict:
    import yaml

    config = {
        "base_model": model, "datasets": [{"path": str(data), "type": "alpaca"}], "output_dir": str(root / mode),
        "device": "cpu", "bnb_4bit_compute_dtype": "float32", "max_steps": steps, "micro_batch_size": 4,
        "sequence_len": 256, "logging_steps": 1, "dataset_cache": False, "gradient_checkpointing": False,
        "streaming": mode == "stream",
    }  # fmt: skip
    path = root / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = None
    assert proc.stderr is not None
    for line in proc.stderr:
        if first is None and line.startswith("step 1/"):
            first = time.perf_counter() - started
        sys.stderr.write(f"[{mode}] {line}")
    out = proc.stdout.read() if proc.stdout else ""
    code = proc.wait()
    result = {"mode": mode, "exit": code, "first_step_s": first, "total_s": time.perf_counter() - started}
    if code == 0:
        result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--mb", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["stream", "whole"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data.jsonl"
        rows = write_rows(data, args.mb)
        print(json.dumps({"file_mb": os.path.getsize(data) / 1e6, "rows": rows}), flush=True)
        for mode in args.modes:
            print(json.dumps(run_mode(mode, args.model, data, args.steps, root)), flush=True)


if __name__ == "__main__":
    main()
