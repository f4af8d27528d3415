"""Benchmark: `qlora merge` against PEFT's merge_and_unload + save_pretrained, time and peak memory.

    python scripts/bench_merge.py                  # ~1.1B-parameter Llama-shaped model (TinyLlama shape), bf16
    python scripts/bench_merge.py --size small     # ~120M parameters, for a quick run

Builds a random Llama-shaped base in bfloat16 saved in several safetensors shards and a random rank-16 LoRA
adapter on every linear layer (a 4-bit, bf16-compute run folder, as `qlora train` writes it), then merges the
same adapter into the same base three ways, each in its own process:

    peft             AutoModelForCausalLM.from_pretrained(bf16) + PeftModel.from_pretrained + merge_and_unload
                     + save_pretrained (what users do today; the same math as --base-weights original)
    qlora original   qlora merge --base-weights original --no-verify
    qlora dequant    qlora merge (the default: the delta added to dequant(NF4(W))) --no-verify

Time is the wall time of the merge work in the process (imports excluded; the same for all); memory is the
process's peak RSS (VmHWM, which includes the ~0.5 GB that importing torch + transformers costs in
every row; the "imports only" row shows that floor). The last line compares the default `qlora merge` with PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # Llama shapes: hidden, intermediate, layers, heads, kv heads, vocab
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, heads=32, kv=4, vocab=32000),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, heads=12, kv=4, vocab=32000),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, heads=4, kv=2, vocab=1000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

WORKERS = {
    "imports only": """
import torch, transformers, peft, bitsandbytes
import qlora_cli.merge
t = time.perf_counter()
""",
    "peft": """
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, run).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
""",
    "qlora original": """
import bitsandbytes.functional
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from rich.console import Console
from qlora_cli.merge import run_merge
t = time.perf_counter()
run_merge(run, out, base_weights="original", max_shard_size=shard, verify=False, device="cpu", console=Console(quiet=True))
""",
    "qlora dequantized": """
import bitsandbytes.functional
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from rich.console import Console
from qlora_cli.merge import run_merge
t = time.perf_counter()
run_merge(run, out, max_shard_size=shard, verify=False, device="cpu", console=Console(quiet=True))
""",
}
PRELUDE = "import json, sys, time\nbase, run, out, shard = sys.argv[1:5]\n"
EPILOGUE = """
seconds = time.perf_counter() - t
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": peak}))
"""


def build(work: Path, size: str, shard: str, tokenizer: str = "char") -> tuple[Path, Path, int]:
    """(base folder, run folder, parameter count): a random bf16 Llama in shards and a random LoRA run.
    ``tokenizer``: "char" (one token per character) or a ``build_bpe_tokenizer`` kind (GGUF export needs BPE)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora_cli.config import dump_config, load_config
    from qlora_cli.testing.tiny import build_bpe_tokenizer, build_char_tokenizer

    s = SIZES[size]
    base, run = work / "base", work / "run"
    config = LlamaConfig(
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        vocab_size=s["vocab"],
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # random normal, written in place (no float32 copy of the model)
            p.normal_(0.0, 0.02, generator=g) if p.ndim > 1 else p.fill_(1.0)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base, max_shard_size=shard)
    del model
    tok = build_char_tokenizer() if tokenizer == "char" else build_bpe_tokenizer(tokenizer)
    tok.save_pretrained(base)

    # a random rank-16 adapter on every linear layer, in PEFT's format, plus the run config qlora train writes
    r, h, i = 16, s["hidden_size"], s["intermediate_size"]
    kv = s["kv"] * (h // s["heads"])
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
    shapes.update({"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)})
    state = {}
    for layer in range(s["num_hidden_layers"]):
        for name, (n_out, n_in) in shapes.items():
            kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{kind}.{name}"
            state[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) / n_in**0.5
            state[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.01
    run.mkdir(parents=True)
    save_file(state, run / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
        "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS, "bias": "none", "use_rslora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
        "inference_mode": True,
    }  # fmt: skip
    (run / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    cfg = load_config(
        None, base_model=str(base), datasets=[{"path": "none.jsonl"}], lora_r=r, lora_alpha=32,
        lora_target_modules=TARGETS, bnb_4bit_compute_dtype="bfloat16",
    )  # fmt: skip
    (run / "qlora_config.yaml").write_text(dump_config(cfg))
    return base, run, n_params


def measure(name: str, base: Path, run: Path, out: Path, shard: str, threads: int | None) -> dict:
    """Run one worker in a fresh process: seconds of merge work and its peak RSS. The peak is the worker's own
    VmHWM, which starts afresh at exec (``ru_maxrss`` would carry over this process's peak through fork)."""
    shutil.rmtree(out, ignore_errors=True)
    code = PRELUDE + WORKERS[name] + EPILOGUE
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(base), str(run), str(out), shard], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return {"name": name, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--shard-size", default="500MB", help="base and output shard size (default 500MB)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench-merge"))
    parser.add_argument("--keep", action="store_true", help="keep the models in --workdir afterwards")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for every worker (1 on a shared, busy machine)"
    )
    args = parser.parse_args()

    import platform

    import bitsandbytes
    import peft
    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    console = Console()
    work = args.workdir / args.size
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    base, run, n_params = build(work, args.size, args.shard_size)
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    console.print(
        f"base: {n_params / 1e9:.2f}B parameters, {base_bytes / 1e9:.2f} GB bf16 in "
        f"{len(list(base.glob('*.safetensors')))} shards; adapter: r=16 on {', '.join(TARGETS)} "
        f"(built in {time.perf_counter() - t:.0f}s)"
    )
    console.print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}; threads per worker: {args.threads or torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    try:
        rows = [
            measure(name, base, run, work / name.replace(" ", "-"), args.shard_size, args.threads) for name in WORKERS
        ]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    by_name = {r["name"]: r for r in rows}
    peft_row = by_name["peft"]
    table = Table(title=f"merge {n_params / 1e9:.2f}B bf16 model + r=16 all-linear adapter, CPU")
    for col in ("", "merge time (s)", "peak RSS (GB)", "time vs PEFT", "memory vs PEFT"):
        table.add_column(col, justify="right" if col else "left")
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['seconds']:.1f}" if r["name"] != "imports only" else "-",
            f"{r['peak_rss'] / 1e9:.2f}",
            f"{r['seconds'] / peft_row['seconds']:.2f}" if r["name"] != "imports only" else "-",
            f"{r['peak_rss'] / peft_row['peak_rss']:.2f}",
        )
    console.print(table)
    ours = by_name["qlora dequantized"]
    orig = by_name["qlora original"]
    print(
        f"original: time_vs_peft={orig['seconds'] / peft_row['seconds']:.2f} "
        f"memory_vs_peft={orig['peak_rss'] / peft_row['peak_rss']:.2f}"
    )
    print(
        f"time_vs_peft={ours['seconds'] / peft_row['seconds']:.2f} "
        f"memory_vs_peft={ours['peak_rss'] / peft_row['peak_rss']:.2f}"
    )


if __name__ == "__main__":
    main()
