#!/usr/bin/env bash
# What qlora checks and measures on a GPU, sized for a lent machine (a call may run 10 minutes, a task has about
# 15 minutes of device time in all, start-up included):
#
#   bash scripts/gpu_check.sh                  # import check + self-check + gpu-1b bench: under 6 minutes
#   bash scripts/gpu_check.sh bench-8b         # second call: the 8B-shaped bench (builds its model on the GPU)
#   bash scripts/gpu_check.sh longctx          # its own call: longest sequence in 24 GiB, qlora vs PEFT
#   bash scripts/gpu_check.sh memory-plan serve   # optional extras
#   bash scripts/gpu_check.sh dora             # optional: DoRA and LoRA, qlora and PEFT, gpu-1b shape, bf16
#   bash scripts/gpu_check.sh fsdp             # several GPUs: fsdp: true against one process (skipped on one GPU)
#
# The import check runs first and fails fast (versions printed, exit 2 without a CUDA GPU). Every step writes its
# JSON as it goes, so a step cut by its time limit keeps what it measured. Results go to $OUT (default
# gpu-results/), at most 8 files: env.json, gpu-check.log (every step's output) and one JSON per step
# (serve prints its table to the log).
# No network: HF_HUB_OFFLINE=1. Where the machine lacks bitsandbytes, datasets or pydantic, pack them here with
# `../shared/tools/gpu-site.sh .gpu/site.tgz` and carry .gpu/: it is unpacked onto PYTHONPATH after the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# transformers' hub kernels off for every stack (qlora loads without them; the peers' baselines would otherwise try
# to fetch them on a machine that reaches nothing)
export USE_HUB_KERNELS=0
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .gpu/site.tgz ]; then
    mkdir -p /tmp/site && tar -xzf .gpu/site.tgz -C /tmp/site && export PYTHONPATH=".:/tmp/site${PYTHONPATH#.}"
fi
PY=${PYTHON:-python3}
LOG="$OUT/gpu-check.log"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(selfcheck bench-1b)

# -- import check: versions, the GPU, and every module a step imports; nothing else runs if this fails
$PY - "$OUT/env.json" <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, json, platform, sys, time
env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), "versions": {}}
missing = []
for name in ("torch", "transformers", "accelerate", "bitsandbytes", "peft", "datasets", "pydantic", "safetensors"):
    try:
        env["versions"][name] = importlib.import_module(name).__version__
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        missing.append(f"{name} ({type(e).__name__}: {e})")
for name in ("liger_kernel", "unsloth", "triton"):
    try:
        m = importlib.import_module(name)
        env["versions"][name] = getattr(m, "__version__", "installed")
    except Exception as e:  # noqa: BLE001 - optional: recorded, not required
        env["versions"][name] = f"unavailable ({type(e).__name__})"
if "torch" not in env["versions"]:
    print("import check failed: " + "; ".join(missing) + f" (python: {sys.executable}; set PYTHON=...)")
    sys.exit(3)
import torch
env["cuda"] = torch.version.cuda
env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
if env["gpu"]:
    env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
if missing:
    print("import check failed: " + "; ".join(missing))
    sys.exit(3)
if not env["gpu"]:
    print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU run `make test`")
    sys.exit(2)
try:
    import qlora_cli.train.loop, qlora_cli.kernels.lora_linear, bitsandbytes.functional  # noqa: F401
except Exception as e:  # noqa: BLE001
    print(f"import check failed: qlora_cli ({type(e).__name__}: {e})")
    sys.exit(3)
print("import check passed")
EOF
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || exit "$rc"

failed=0
step() {  # name, seconds, command...: output appended to the log; the step's JSON is written by the command
    local name=$1 limit=$2
    shift 2
    echo "=== $name (at most ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    [ $rc -eq 0 ] || failed=1
}

for s in "${STEPS[@]}"; do
    case $s in
        selfcheck) step selfcheck 120 $PY scripts/gpu_selfcheck.py --json "$OUT/selfcheck.json" ;;
        bench-1b) step bench-1b 200 $PY scripts/bench.py --preset gpu-1b --json "$OUT/bench-gpu-1b.json" ;;
        bench-8b) step bench-8b 540 $PY scripts/bench.py --preset gpu-8b --json "$OUT/bench-gpu-8b.json" ;;
        longctx) step longctx 540 $PY scripts/bench.py --preset gpu-8b-longctx --json "$OUT/longctx.json" ;;
        memory-plan) step memory-plan 120 $PY scripts/bench_memory_plan.py --device cuda --json "$OUT/memory-plan.json" ;;
        dora) step dora 300 $PY scripts/bench.py --preset gpu-1b --dora --steps 4 --json "$OUT/bench-dora.json" ;;
        fsdp) step fsdp 300 $PY scripts/gpu_fsdp_check.py --json "$OUT/fsdp.json" ;;
        serve) step serve 120 $PY scripts/bench_serve.py --device cuda --hidden 2048 --layers 16 --new-tokens 128 --dtype bfloat16 ;;
        *) echo "unknown step $s (selfcheck bench-1b bench-8b longctx memory-plan serve dora fsdp)" | tee -a "$LOG"; failed=1 ;;
    esac
    grep -E "^(PASS|FAIL|[0-9]+/[0-9]+ checks|speedup_vs_peft|dora_|longctx_vs_peft|peft |qlora |reference)" "$LOG" | tail -n 12
done
ls "$OUT"
exit $failed
