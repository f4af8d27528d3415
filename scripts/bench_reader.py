"""Benchmark: how `qlora merge` reads base shards, against safetensors' own reader, time and peak memory.

    python scripts/bench_reader.py                 # the 1.1B Llama-shaped bf16 base of bench_merge.py (~2.2 GB)
    python scripts/bench_reader.py --size small    # ~120M parameters, for a quick run

merge reads one base tensor at a time, turns it into float32 for the math and drops it. Each reader below does
exactly that over every tensor of every shard, in its own process (so each peak is its own):

    qlora file reads     qlora_cli.merge.safetensors_stream.read_tensor: plain reads into a buffer of our own
    safe_open get_slice  safetensors.safe_open(..., framework="pt").get_slice(name)[:]   (memory-mapped)
    safe_open get_tensor safetensors.safe_open(..., framework="pt").get_tensor(name)     (memory-mapped)

Peak memory is the process's VmHWM, which counts the file pages a memory map has touched while it is open (they
are resident in this process, even though the kernel can drop them under pressure); seconds are the reading
alone, after one untimed pass that warms the page cache for every reader alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKER = """
import json, sys, time
from pathlib import Path
import torch
from qlora_cli.merge.safetensors_stream import base_shard_files, read_header, read_tensor
kind, folder = sys.argv[1], Path(sys.argv[2])
files = base_shard_files(folder)
start = time.perf_counter()
total = 0.0
for path in files:
    if kind == "qlora file reads":
        infos, _ = read_header(path)
        with open(path, "rb") as f:
            for info in infos:
                w = read_tensor(f, info).float()
                total += float(w[0].sum())
                del w
    else:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                w = (f.get_slice(name)[:] if kind == "safe_open get_slice" else f.get_tensor(name)).float()
                total += float(w.reshape(-1)[:1].sum()) if w.ndim == 1 else float(w[0].sum())
                del w
seconds = time.perf_counter() - start
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": peak, "checksum": total}))
"""
READERS = ["qlora file reads", "safe_open get_slice", "safe_open get_tensor"]


def run_reader(kind: str, base: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", WORKER, kind, str(base)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return {"reader": kind, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b", choices=["1b", "small", "tiny"])
    parser.add_argument("--shard", default="1GB", help="max_shard_size of the base (transformers' units)")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    from bench_merge import build  # the same base as the merge benchmark

    with tempfile.TemporaryDirectory(prefix="qlora-bench-reader-") as tmp:
        base, _, n_params = build(Path(tmp), args.size, args.shard)
        shard_bytes = [p.stat().st_size for p in base.glob("*.safetensors")]
        print(f"base: {n_params / 1e9:.2f}B parameters, bf16, {len(shard_bytes)} shards, largest "
              f"{max(shard_bytes) / 2**30:.2f} GiB")  # fmt: skip
        run_reader(READERS[0], base)  # warm the page cache
        rows = [run_reader(kind, base) for kind in READERS]
        rows += [run_reader(kind, base) for kind in reversed(READERS)]  # the other order: drift shows
    imports_only = run_reader_floor()
    print(f"{'reader':<22}{'seconds':>9}{'peak RSS GiB':>14}{'above imports GiB':>19}")
    for r in rows:
        above = (r["peak_rss"] - imports_only) / 2**30
        print(f"{r['reader']:<22}{r['seconds']:>9.2f}{r['peak_rss'] / 2**30:>14.2f}{above:>19.2f}")
    if len({round(r["checksum"], 3) for r in rows}) != 1:
        raise SystemExit("the readers read different numbers")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "imports_only": imports_only, "rows": rows}))


def run_reader_floor() -> int:
    """Peak RSS of a worker that imports what the readers import and reads nothing."""
    code = (
        "import torch, safetensors, qlora_cli.merge.safetensors_stream\n"
        "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)


if __name__ == "__main__":
    main()
