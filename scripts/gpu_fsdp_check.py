"""FSDP-QLoRA on a lent multi-GPU machine: `fsdp: true` over every GPU against one process with as many times
the accumulation, on a tiny random Llama (4-bit, bf16 compute and storage). Skipped, with a message and a JSON
saying so, where there are fewer than two GPUs.

    python scripts/gpu_fsdp_check.py --json gpu-results/fsdp.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    import torch
    import yaml
    from safetensors.torch import load_file

    from qlora_cli.testing.tiny import build_tiny_model
    from tests.conftest import upper_rows, write_jsonl

    gpus = torch.cuda.device_count()
    out: dict = {"gpus": gpus}
    if gpus < 2:
        out["skipped"] = f"FSDP needs 2 or more GPUs; this machine has {gpus}"
        print(out["skipped"])
        Path(args.json).write_text(json.dumps(out, indent=2))
        return
    tmp = Path(tempfile.mkdtemp())
    base = build_tiny_model(tmp / "base", "llama", hidden=256, layers=4)
    data = write_jsonl(tmp / "d.jsonl", upper_rows(64 * gpus, seed=5))
    common = dict(base_model=str(base), datasets=[{"path": str(data)}], bnb_4bit_compute_dtype="bfloat16",
                  bnb_4bit_quant_storage="bfloat16", micro_batch_size=4, max_steps=6, lora_dropout=0.0,
                  learning_rate=2e-3, lora_target_modules="all-linear", logging_steps=1, device="cuda")  # fmt: skip
    runs = {"one": {**common, "gradient_accumulation_steps": 2 * gpus},
            "fsdp": {**common, "gradient_accumulation_steps": 2, "fsdp": True, "save_steps": 3}}  # fmt: skip
    for name, cfg in runs.items():
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp / name)}))
        launch = [sys.executable, "-m", "qlora_cli", "train", str(path)]
        if name == "fsdp":
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
                      "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qlora_cli", "train", str(path)]  # fmt: skip
        ran = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=400)
        out[f"{name}_exit"] = ran.returncode
        print(ran.stderr[-2000:])
        if ran.returncode:
            Path(args.json).write_text(json.dumps(out, indent=2))
            sys.exit(1)
        out[f"{name}_losses"] = [json.loads(line)["loss"] for line in (tmp / name / "metrics.jsonl").read_text().splitlines()
                                 if json.loads(line).get("type") == "train"]  # fmt: skip
    a, b = load_file(tmp / "one" / "adapter_model.safetensors"), load_file(tmp / "fsdp" / "adapter_model.safetensors")
    out["adapter_max_abs_diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
    out["adapter_max_abs"] = max(a[k].abs().max().item() for k in a)
    out["loss_max_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(out["one_losses"], out["fsdp_losses"]))
    out["passed"] = out["loss_max_rel_diff"] < 2e-2  # bf16 compute: rounding differs with the reduction order
    print(json.dumps(out))
    Path(args.json).write_text(json.dumps(out, indent=2))
    sys.exit(0 if out["passed"] else 1)


if __name__ == "__main__":
    main()
