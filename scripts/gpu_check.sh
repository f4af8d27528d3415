#!/usr/bin/env bash
# Everything qlora checks and measures on a GPU, in one call, each step under its own time limit:
#
#   bash scripts/gpu_check.sh                      # selfcheck bench-1b memory-plan serve (about 8 minutes)
#   bash scripts/gpu_check.sh bench-8b longctx     # the 8B-shaped presets (build a 16 GB random model first)
#
# Results (JSON and one log per step) go to $OUT (default gpu-results/). Where the machine lacks
# bitsandbytes, datasets or pydantic, pack them here with `../shared/tools/gpu-site.sh .gpu/site.tgz` and
# carry .gpu/: the script unpacks it onto PYTHONPATH after the working tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .gpu/site.tgz ]; then
    mkdir -p /tmp/site && tar -xzf .gpu/site.tgz -C /tmp/site && export PYTHONPATH=".:/tmp/site${PYTHONPATH#.}"
fi
PY=${PYTHON:-python}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(selfcheck bench-1b memory-plan serve)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c 'import torch, transformers, bitsandbytes, peft, accelerate; print({m.__name__: m.__version__ for m in (torch, transformers, bitsandbytes, peft, accelerate)})' >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

failed=0
step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (at most ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    [ $rc -eq 0 ] || failed=1
}

for s in "${STEPS[@]}"; do
    case $s in
        selfcheck) step selfcheck 240 $PY scripts/gpu_selfcheck.py --json "$OUT/selfcheck.json" ;;
        bench-1b) step bench-1b 240 $PY scripts/bench.py --preset gpu-1b --json "$OUT/bench-gpu-1b.json" ;;
        memory-plan) step memory-plan 120 $PY scripts/bench_memory_plan.py --device cuda --json "$OUT/memory-plan.json" ;;
        serve) step serve 120 $PY scripts/bench_serve.py --device cuda --hidden 2048 --layers 16 --new-tokens 128 --dtype bfloat16 ;;
        bench-8b) step bench-8b 540 $PY scripts/bench.py --preset gpu-8b --json "$OUT/bench-gpu-8b.json" ;;
        longctx) step longctx 540 $PY scripts/bench.py --preset gpu-8b-longctx --json "$OUT/bench-longctx.json" ;;
        *) echo "unknown step $s (selfcheck bench-1b memory-plan serve bench-8b longctx)"; failed=1 ;;
    esac
done
exit $failed
