"""Regenerate the demo task shipped in data/demo/: reverse a lowercase word.

    {"prompt": "reverse: planet\nanswer: ", "completion": "tenalp"}

Eval words never appear in the training set, so the score measures the learned rule, not memory.
Deterministic: running it again writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "demo"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def row(w: str) -> dict[str, str]:
    return {"prompt": f"reverse: {w}\nanswer: ", "completion": w[::-1]}


def main() -> None:
    rng = random.Random(1234)
    taken: set[str] = set()
    train, evals = words(rng, 2000, taken), words(rng, 200, taken)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, ws in (("train.jsonl", train), ("eval.jsonl", evals)):
        (OUT / name).write_text("".join(json.dumps(row(w)) + "\n" for w in ws))
    print(f"wrote {len(train)} train and {len(evals)} eval rows to {OUT}")


if __name__ == "__main__":
    main()
