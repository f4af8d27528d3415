"""How much of the 4-bit base's quantization error LoftQ's start takes back, on a config's base and targets.

    python scripts/loftq_error.py configs/demo-smollm2-cpu.yaml [--r 16 --r 64]

For every targeted layer: ‖W − Q‖ (the NF4 base alone) and ‖W − (Q + s·BA)‖ (with ``init_lora_weights: loftq``),
W the base's original weights (a GGUF base: its weights as the GGUF file holds them), summed over the layers as
Frobenius norms and given relative to ‖W‖, per module name and in all. Runs on the CPU (or the config's device).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--r", type=int, action="append", help="ranks to measure (default: the config's lora_r)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    from qlora_cli.config import load_config
    from qlora_cli.kernels.lora_linear import dense_weight
    from qlora_cli.model.loading import load_base_model, quiet_libraries
    from qlora_cli.model.lora import inject_lora, lora_layers
    from qlora_cli.model.starts import apply_start, original_weights

    quiet_libraries()
    torch.set_grad_enabled(False)
    results = {}
    for r in args.r or [None]:
        cfg = load_config(args.config)
        cfg = cfg.model_copy(update={"init_lora_weights": "loftq", **({"lora_r": r} if r else {})})
        model = load_base_model(cfg, torch.device("cpu"))
        inject_lora(model, cfg.lora)
        reader = original_weights(cfg.base)
        apply_start(model, cfg.lora, reader)
        sums: dict[str, list[float]] = {}
        for name, layer in lora_layers(model):
            from qlora_cli.model.starts import oriented

            q = dense_weight(layer.base, torch.float32).clone()
            w = oriented(reader(name, q.shape), q)
            fixed = q + layer.delta_weight().reshape(q.shape)
            kind = name.rsplit(".", 1)[-1]
            for key in (kind, "all"):
                acc = sums.setdefault(key, [0.0, 0.0, 0.0])
                acc[0] += float((w - q).norm() ** 2)
                acc[1] += float((w - fixed).norm() ** 2)
                acc[2] += float(w.norm() ** 2)
        rank = cfg.lora_r
        print(f"r={rank} (lora_alpha {cfg.lora_alpha:g}), {cfg.base_model}: relative error ‖W − ·‖ / ‖W‖")
        print(f"{'modules':<12} {'NF4 alone':>10} {'NF4 + LoftQ':>12} {'error left':>11}")
        table = {}
        for key, (nf4, loftq, norm) in sums.items():
            row = {"nf4": (nf4 / norm) ** 0.5, "loftq": (loftq / norm) ** 0.5, "left": (loftq / nf4) ** 0.5}
            table[key] = row
            print(f"{key:<12} {row['nf4']:>10.4f} {row['loftq']:>12.4f} {row['left']:>10.1%}")
        results[str(rank)] = table
        del model
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
