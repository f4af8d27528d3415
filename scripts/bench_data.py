"""Tokenization speed and the cache: N Alpaca-like rows, tokenized once (rows/s, cache filled), then loaded
from the cache (seconds until the examples are ready, which is what a cached run adds before its first step).

    python scripts/bench_data.py --tokenizer PATH [--rows 100000] [--num-proc 1 2] [--type alpaca|chat]

PATH is a tokenizer folder (e.g. a converted GGUF in ~/.cache/qlora/gguf/...); without it, qlora's tiny
character tokenizer is used (not representative of BPE speed). The cache goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "the model data train answer question explain write list give short long python code function value "
    "number text city river history science because which about there would their other"
).split()


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [
        {
            "instruction": sentence(6, 20),
            "input": sentence(0, 30) if rng.random() < 0.4 else "",
            "output": sentence(20, 120),
        }
        for _ in range(n)
    ]


def chat_row(row: dict) -> dict:
    user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--type", default="alpaca", choices=["alpaca", "chat"])
    ap.add_argument("--sequence-len", type=int, default=512)
    args = ap.parse_args()

    from qlora_cli.config import DatasetSpec, DataSettings
    from qlora_cli.data.pipeline import build_datasets

    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from qlora_cli.testing.tiny import build_char_tokenizer

        tokenizer = build_char_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        rows = alpaca_rows(args.rows)
        with data.open("w") as f:
            for r in rows:
                f.write(json.dumps(chat_row(r) if args.type == "chat" else r) + "\n")
        print(f"{args.rows} {args.type} rows, tokenizer {args.tokenizer or 'tiny char'}, cpu_count {os.cpu_count()}")
        for num_proc in args.num_proc:
            os.environ["QLORA_CACHE"] = str(Path(tmp) / f"cache-{num_proc}")
            settings = DataSettings(
                datasets=[DatasetSpec(path=str(data), type=args.type)], eval_datasets=[], val_set_size=0.0,
                train_on_inputs=False, sequence_len=args.sequence_len, seed=0, cache=True, num_proc=num_proc,
                allow_degenerate=True,
            )  # fmt: skip
            t = time.perf_counter()
            built = build_datasets(settings, tokenizer)
            first = time.perf_counter() - t
            t = time.perf_counter()
            again = build_datasets(settings, tokenizer)
            cached = time.perf_counter() - t
            assert [e.input_ids for e in again.train[:100]] == [e.input_ids for e in built.train[:100]]
            print(
                f"num_proc {num_proc}: first run {first:.1f}s ({args.rows / first:,.0f} rows/s, "
                f"{built.train_stats.tokens:,} tokens); cached run {cached:.1f}s to examples ready"
            )


if __name__ == "__main__":
    main()
