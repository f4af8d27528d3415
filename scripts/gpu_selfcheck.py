"""Correctness of the GPU paths in one short run (the CPU paths are covered by `make test`).

    python scripts/gpu_selfcheck.py                       # on a CUDA machine, a few minutes at most
    python scripts/gpu_selfcheck.py --device cpu --dtype float32   # the same checks on a CPU

1. the fused LoRA node equals the plain LoRALinear on a 4-bit layer under autocast, dropout on: outputs, the
   input's gradient and the adapter's gradients;
2. the fused head + cross-entropy equals the plain loss and its gradients on a tiny Llama; the SwiGLU MLP as one
   node equals its three LoRA layers with SiLU and product between them (dropout on); the fused RMSNorm equals
   transformers' (weight trained); compiled decoder layers equal the plain model;
3. `qlora train` on the shipped demo task (reverse a word) with gradient checkpointing, in the compute dtype:
   `qlora eval` shows exact match rising from the base's;
4. PEFT loads that adapter on the same 4-bit base and gives qlora's logits: both stacks run under the run's
   autocast (``Precision``), over 8 x 64 positions; top-1 is judged only where the top token is decisive (leads
   by ``TOP1_MARGIN`` as in the merge self-check) and on at least ``MIN_DECISIVE`` such positions, so one
   rounding flip (< 1%) cannot fail a correct run;
5. `qlora merge` of the run on the device passes its self-check (exit 0).

Prints one PASS/FAIL line per check with its numbers, writes them to --json, exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_cli.config import load_config  # noqa: E402
from qlora_cli.model.loading import DTYPES, disable_cpu_weight_repacking, load_base_model, quiet_libraries  # noqa: E402
from qlora_cli.model.lora import LoRALinear, inject_lora, lora_layers, set_fused  # noqa: E402
from qlora_cli.testing.tiny import build_tiny_model  # noqa: E402
from qlora_cli.train.loss import loss_sum  # noqa: E402
from qlora_cli.train.step import Precision  # noqa: E402

RESULTS: list[dict[str, Any]] = []
REPORT: dict[str, Any] = {}  # written to --json after every check: a run cut short keeps what it measured
JSON_PATH: Path | None = None


def write_report() -> None:
    if JSON_PATH is not None:
        JSON_PATH.write_text(json.dumps({**REPORT, "results": RESULTS}, indent=2))


def check(name: str, ok: bool, **numbers: Any) -> None:
    RESULTS.append({"check": name, "ok": bool(ok), **numbers})
    write_report()
    shown = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {shown}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def fused_lora_matches_plain(base_dir: Path, device: torch.device, dtype: str, dropout: float = 0.1) -> None:
    """One 4-bit LoRA layer, fused against plain, with dropout and (float32, more rows than features) without."""
    cfg = load_config(None, base_model=str(base_dir), datasets=[{"path": "x"}], bnb_4bit_compute_dtype=dtype)
    base = load_base_model(cfg, device).model.layers[0].mlp.up_proj
    layer = LoRALinear(base, r=8, alpha=16, dropout=dropout).to(device)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    rows = 33 if dropout else 2 * max(layer.in_features, layer.out_features)
    x0 = torch.randn(4, rows, layer.in_features, device=device)
    results = []
    for fused in (False, True):
        layer.fused = fused
        layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(3)  # the same dropout mask on both paths
        with Precision.for_run(dtype, device).autocast():
            y = layer(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        results.append((y.detach(), x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()))
    errors = [rel(f, p) for p, f in zip(*results)]
    tol = 1e-5 if dtype == "float32" else 2e-2
    check(
        f"fused LoRA node == plain (4-bit, {dtype}, {'dropout' if dropout else 'no dropout'})",
        max(errors) < tol,
        max_rel_error=max(errors),
        tol=tol,
    )


def lora_model(base_dir: Path, device: torch.device, dtype: str, dropout: float, b_std: float) -> Any:
    """The tiny 4-bit model with LoRA on every linear layer, B drawn with ``b_std`` so adapters matter."""
    cfg = load_config(
        None, base_model=str(base_dir), datasets=[{"path": "x"}], bnb_4bit_compute_dtype=dtype,
        lora_target_modules="all-linear", lora_dropout=dropout,
    )  # fmt: skip
    model = load_base_model(cfg, device)
    inject_lora(model, cfg.lora)
    for _, m in lora_layers(model):
        with torch.no_grad():
            m.lora_B.weight.normal_(0, b_std)
    return model


def fused_mlp_matches_plain(base_dir: Path, device: torch.device, dtype: str) -> None:
    model = lora_model(base_dir, device, dtype, dropout=0.1, b_std=0.1).train()
    mlp = model.model.layers[0].mlp
    x0 = torch.randn(4, 33, model.config.hidden_size, device=device)
    results = []
    for fused in (False, True):
        set_fused(model, fused)
        model.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(3)  # the same dropout masks on both paths
        with Precision.for_run(dtype, device).autocast():
            y = mlp(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        grads = [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
        results.append([y.detach(), x.grad] + grads)
    errors = [rel(f, p) for p, f in zip(*results)]
    tol = 1e-5 if dtype == "float32" else 2e-2
    check("fused SwiGLU MLP == plain (4-bit, dropout)", max(errors) < tol, max_rel_error=max(errors), tol=tol)


def fused_norm_matches_plain(base_dir: Path, device: torch.device, dtype: str) -> None:
    """A decoder layer's norm through the fused RMSNorm node against transformers' own, on the device."""
    model = lora_model(base_dir, device, dtype, dropout=0.0, b_std=0.1).train()
    norm = model.model.layers[0].post_attention_layernorm
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
    norm.weight.requires_grad_(True)
    x0 = 2 * torch.randn(4, 33, model.config.hidden_size, device=device) + 0.5
    results = []
    for fused in (False, True):
        set_fused(model, True, norms=fused)
        model.eval().train()  # as training does after fusing: a mode change must not put transformers' forward back
        installed = "forward" in norm.__dict__
        norm.weight.grad = None
        x = x0.to(norm.weight.dtype, copy=True).requires_grad_(True)
        with Precision.for_run(dtype, device).autocast():
            y = norm(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        results.append((y.detach(), x.grad, norm.weight.grad.clone()))
    errors = [rel(f, p) for p, f in zip(*results)]
    tol = 1e-5 if dtype == "float32" else 2e-2
    check(
        "fused RMSNorm == transformers' (weight trained)",
        max(errors) < tol and installed,
        max_rel_error=max(errors), tol=tol, fused_forward_installed=installed,
    )  # fmt: skip


def fused_loss_matches_plain(base_dir: Path, device: torch.device, dtype: str) -> None:
    model = lora_model(base_dir, device, dtype, dropout=0.0, b_std=0.05)
    ids = torch.randint(5, 90, (3, 40), device=device)
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with Precision.for_run(dtype, device).autocast():
            s, n = loss_sum(model, batch, fused=fused)
        (s / n).backward()
        grad = torch.cat([m.lora_A.weight.grad.flatten() for _, m in lora_layers(model)])
        out.append((s.detach() / n, grad))
    loss_err, grad_err = abs(out[1][0] - out[0][0]).item() / out[0][0].item(), rel(out[1][1], out[0][1])
    tol = 1e-4 if dtype == "float32" else 2e-2
    check("fused head + loss == plain", max(loss_err, grad_err) < tol, loss_rel=loss_err, grad_rel=grad_err)


def qlora(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def train_eval_merge(work: Path, device: str, dtype: str, steps: int) -> None:
    base = build_tiny_model(work / "base", "llama", seed=0, hidden=128, layers=2, heads=4, kv_heads=4,
                            initializer_range=0.1)  # fmt: skip
    run = work / "run"
    sets = {
        "base_model": str(base), "output_dir": str(run), "device": device, "bnb_4bit_compute_dtype": dtype,
        "max_steps": steps, "warmup_steps": 10, "eval_steps": "null", "logging_steps": 50,
        "gradient_checkpointing": "offload" if device == "cuda" else "true", "lora_dropout": 0.05,
    }  # fmt: skip
    t = time.perf_counter()
    args = ["train", "configs/demo-cpu.yaml"] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    res = qlora(*args)
    check("qlora train (demo task)", res.returncode == 0, seconds=time.perf_counter() - t, rc=res.returncode)
    if res.returncode:
        print(res.stderr[-3000:])
        return
    res = qlora("eval", str(run), "--limit", "100", "--json", str(work / "eval.json"), "--device", device)
    if res.returncode:
        check("qlora eval", False, rc=res.returncode)
        print(res.stderr[-3000:])
        return
    models = {m["name"]: m for m in json.loads((work / "eval.json").read_text())["models"]}
    adapter = next(m for name, m in models.items() if name != "base")
    base_em, tuned_em = models["base"]["exact_match"], adapter["exact_match"]
    check("adapter learns the task (exact match)", tuned_em >= base_em + 0.3, base=base_em, adapter=tuned_em)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_cli.run_folder import load_adapted_model, open_run

    ours, _ = load_adapted_model(open_run(run), torch.device(device))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=DTYPES[dtype])  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=DTYPES[dtype],
                                                     device_map={"": torch.device(device)})  # fmt: skip
    disable_cpu_weight_repacking(reference)  # on a CPU: bitsandbytes' eval kernel computes in bf16 otherwise
    peft_model = PeftModel.from_pretrained(reference, run).eval()
    compare_with_peft(ours, peft_model, torch.device(device), dtype)

    t = time.perf_counter()
    res = qlora("merge", str(run), "-o", str(work / "merged"), "--device", device)
    check("qlora merge self-check", res.returncode == 0, seconds=time.perf_counter() - t, rc=res.returncode)
    if res.returncode:
        print(res.stderr[-3000:])


MIN_DECISIVE = 100  # positions where the reference's top token leads clearly: one flip is at most 1%


def compare_with_peft(ours: Any, peft_model: Any, device: torch.device, dtype: str) -> dict[str, Any]:
    """qlora's adapted model and PEFT's on the same prompts (8 x 64 positions), both under the run's autocast:
    relative logit error, and top-1 agreement where PEFT's top token is decisive (``TOP1_MARGIN``)."""
    from qlora_cli.merge.self_check import TOP1_MARGIN, compare_logits
    from qlora_cli.train.step import Precision

    ids = torch.randint(5, 90, (8, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), Precision.for_run(dtype, device).autocast():
        a, b = ours(input_ids=ids).logits.float(), peft_model(input_ids=ids).logits.float()
    a, b = a.flatten(0, 1).cpu(), b.flatten(0, 1).cpu()  # (N, V)
    _, kl, top1, top1_decisive = compare_logits([b], [a])
    top2 = b.topk(2, dim=-1).values
    decisive = int(((top2[:, 0] - top2[:, 1]) >= TOP1_MARGIN).sum())
    err = rel(a, b)
    tol = 5e-3 if dtype == "float32" else 3e-2  # two stacks' 4-bit kernels: the same weights, other rounding
    ok = err < tol and top1_decisive >= 0.98 and decisive >= MIN_DECISIVE
    numbers = dict(rel_error=err, tol=tol, mean_kl=kl, top1=top1, top1_decisive=top1_decisive, decisive=decisive)
    check("PEFT loads the adapter: same logits", ok, **numbers)
    return numbers


def compiled_layers_match_plain(base_dir: Path, device: torch.device, dtype: str) -> None:
    """torch_compile: true (each decoder layer compiled, LoRA layers between the pieces) against the plain model."""
    from qlora_cli.kernels.compile import compile_layers

    cfg = load_config(
        None, base_model=str(base_dir), datasets=[{"path": "x"}], bnb_4bit_compute_dtype=dtype,
        lora_target_modules="all-linear", lora_dropout=0.1,
    )  # fmt: skip
    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = load_base_model(cfg, device)
        inject_lora(model, cfg.lora)
        for _, m in lora_layers(model):
            with torch.no_grad():
                m.lora_B.weight.normal_(0, 0.05)
        if compiled and not compile_layers(model, device, print, lambda m: isinstance(m, LoRALinear)):
            check("torch_compile layers == plain", False, reason="not compiled")
            return
        model.train()
        torch.manual_seed(2)  # the same dropout masks
        with Precision.for_run(dtype, device).autocast():
            h = model.model(input_ids=torch.randint(5, 90, (3, 40), device=device)).last_hidden_state
        (h.float() * torch.linspace(-1, 1, h.shape[-1], device=device)).sum().backward()
        out.append((h.detach(), torch.cat([m.lora_A.weight.grad.flatten() for _, m in lora_layers(model)])))
    errors = [rel(c, p) for p, c in zip(*out)]
    tol = 1e-4 if dtype == "float32" else 2e-2
    check("torch_compile layers == plain", max(errors) < tol, out_rel=errors[0], grad_rel=errors[1], tol=tol)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--steps", type=int, default=800, help="training steps on the demo task")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    quiet_libraries()
    global JSON_PATH
    JSON_PATH = args.json
    REPORT.update(
        device=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    write_report()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="qlora-gpu-check-") as tmp:
        work = Path(tmp)
        small = build_tiny_model(work / "small", "llama", seed=1, initializer_range=0.1)
        checks = (
            fused_lora_matches_plain,
            fused_mlp_matches_plain,
            fused_norm_matches_plain,
            fused_loss_matches_plain,
            compiled_layers_match_plain,
        )
        for fn in checks:
            fn(small, device, args.dtype)
        fused_lora_matches_plain(small, device, "float32", dropout=0.0)
        train_eval_merge(work, args.device, args.dtype, args.steps)
    write_report()
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
