"""Benchmark: `qlora export` to GGUF against `qlora merge` to safetensors, time and peak memory.

    python scripts/bench_export.py                 # ~1.1B-parameter Llama-shaped model (TinyLlama shape), bf16
    python scripts/bench_export.py --size small    # ~120M parameters, for a quick run

The base and the rank-16 all-linear adapter are bench_merge.py's (a 4-bit, bf16-compute run; a small BPE
tokenizer, padded to the 32000 rows). Each row runs in its own process, with the self-check off (it loads the
model twice and would dominate both):

    qlora merge         qlora merge --no-verify              (bf16 safetensors shards)
    qlora export f16    qlora export --quant f16 --no-verify (one GGUF file)
    qlora export q8_0   ... --quant q8_0                     (the default)
    qlora export q4_0   ... --quant q4_0
    qlora export q4_k_m ... --quant q4_k_m               (K-quants, written by qlora's own numpy quantizer)

All four compute the same merged weights (the delta added to dequant(NF4(W)), streamed tensor by tensor).
Time is the work in the process (imports excluded); memory is its peak RSS (VmHWM, imports included; the
"imports only" row shows that floor).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench_merge  # noqa: E402

EXPORT = """
import bitsandbytes.functional, gguf
from rich.console import Console
from qlora_cli.export import run_export
t = time.perf_counter()
run_export(run, out + ".gguf", quant="{quant}", verify=False, force=True, device="cpu", console=Console(quiet=True))
"""
WORKERS = {
    "imports only": bench_merge.WORKERS["imports only"],
    "qlora merge": bench_merge.WORKERS["qlora dequantized"],
    **{f"qlora export {q}": EXPORT.replace("{quant}", q) for q in ("f16", "q8_0", "q4_0", "q4_k_m")},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(bench_merge.SIZES), default="1b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench-export"))
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every worker")
    args = parser.parse_args()

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    console = Console()
    work = args.workdir / args.size
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base, run, n_params = bench_merge.build(work, args.size, "500MB", tokenizer="llama3")
    console.print(
        f"base: {n_params / 1e9:.2f}B parameters bf16; adapter r=16 all-linear; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, gguf {importlib.metadata.version('gguf')}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    bench_merge.WORKERS.clear()
    bench_merge.WORKERS.update(WORKERS)
    rows = []
    try:
        for name in WORKERS:
            out = work / name.replace(" ", "-")
            t = time.perf_counter()
            row = bench_merge.measure(name, base, run, out, "5GB", args.threads)
            files = list(out.glob("*.safetensors")) if out.is_dir() else [Path(str(out) + ".gguf")]
            row["bytes"] = sum(f.stat().st_size for f in files if f.exists())
            row["wall"] = time.perf_counter() - t
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    merge = next(r for r in rows if r["name"] == "qlora merge")
    table = Table(title=f"export {n_params / 1e9:.2f}B bf16 model + r=16 all-linear adapter, CPU")
    for col in ("", "time (s)", "peak RSS (GB)", "output (GB)", "time vs merge", "memory vs merge"):
        table.add_column(col, justify="right" if col else "left")
    for r in rows:
        imports = r["name"] == "imports only"
        table.add_row(
            r["name"],
            "-" if imports else f"{r['seconds']:.1f}",
            f"{r['peak_rss'] / 1e9:.2f}",
            "-" if imports else f"{r['bytes'] / 1e9:.2f}",
            "-" if imports else f"{r['seconds'] / merge['seconds']:.2f}",
            f"{r['peak_rss'] / merge['peak_rss']:.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
