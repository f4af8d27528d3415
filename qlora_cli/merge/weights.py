"""The merge math: W' = base(W) + scaling · B @ A in float32, where base(W) is dequant(NF4(W)) exactly as the
run's 4-bit base held it (``dequantized``) or W itself (``original``)."""

from __future__ import annotations

import math

import torch

from qlora_cli.config import QuantSettings
from qlora_cli.merge.plan import RowsTarget, Target
from qlora_cli.merge.report import LayerStat
from qlora_cli.model.loading import DTYPES

BNB_BLOCKSIZE = 64  # transformers' BitsAndBytesConfig always quantizes with bitsandbytes' default block size
# ---------------------------------------------------------------------------------------------
# the math


def nf4_roundtrip(weight: torch.Tensor, quant: QuantSettings, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequant(quant(weight)) exactly as the run's 4-bit base held it: ``weight`` (out, in) is cast to the
    compute dtype and quantized with the run's type, double quantization and block size, like transformers
    and bitsandbytes do at load time. Returns the dequantized weight in the compute dtype (those values in
    ``out_dtype`` when given), on weight's device."""
    import bitsandbytes.functional as bnbf

    w = weight.to(DTYPES[quant.compute_dtype]).contiguous()
    if w.device.type == "cpu":  # the same values without bitsandbytes' per-element search (kernels.nf4)
        from qlora_cli.kernels.nf4 import roundtrip_4bit

        return roundtrip_4bit(w, quant.quant_type, quant.double_quant, BNB_BLOCKSIZE, out_dtype)
    packed, state = bnbf.quantize_4bit(
        w, blocksize=BNB_BLOCKSIZE, compress_statistics=quant.double_quant, quant_type=quant.quant_type
    )
    out = bnbf.dequantize_4bit(packed, state)
    return out if out_dtype is None else out.to(out_dtype)


def merged_weight(
    weight: torch.Tensor, target: Target, scaling: float, base_weights: str, quant: QuantSettings, device: torch.device
) -> tuple[torch.Tensor, LayerStat]:
    """(W' = base + scaling · B @ A in float32, in the base shard's layout; its statistics).

    ``weight`` is the base tensor: (out, in), or (in, out) for a Conv1D layer. W' is formed in place in
    one float32 copy of the base weight (``addmm_``), so the peak is a few copies of this one weight.
    """
    A, B = target.lora_A.to(device), target.lora_B.to(device)  # (r, in), (out, r)
    w = weight.to(device)
    w = w.T if target.conv1d else w  # (out, in): the layout bitsandbytes quantized (block boundaries depend on it)
    quant_err = None
    if target.quantized and base_weights == "dequantized":
        base = nf4_roundtrip(w, quant, torch.float32)  # exactly what training saw: see nf4_roundtrip
        quant_err = _distance(w, base)
    else:
        if target.quantized:  # the NF4 error is only reported here, so estimate it on a sample of rows
            quant_err = nf4_error_estimate(w, quant)
        base = w.float()  # a float32 copy (or the float32 base tensor itself, which nothing else needs)
    base_norm = torch.linalg.vector_norm(base).item()
    base.addmm_(B, A, alpha=scaling)  # W' = W + s · (out, r) @ (r, in)
    if target.magnitude is not None:  # DoRA: each row rescaled to its trained magnitude, m / ‖W + s·BA‖_row
        base.mul_((target.magnitude.to(device) / torch.linalg.vector_norm(base, dim=1))[:, None])
    # ‖s·B A‖_F² = s² · Σ (BᵀB ⊙ A Aᵀ): two (r, r) products instead of the (out, in) delta
    delta_norm = scaling * math.sqrt(max(((B.T @ B) * (A @ A.T)).sum().item(), 0.0))
    stat = LayerStat(
        target.module,
        delta_norm / base_norm if base_norm else math.inf,
        None if quant_err is None else (quant_err / delta_norm if delta_norm else math.inf),
    )
    return (base.T if target.conv1d else base), stat


def nf4_error_estimate(weight: torch.Tensor, quant: QuantSettings, sample: int = 2**18) -> float:
    """‖W − dequant(NF4(W))‖_F for ``weight`` (out, in), estimated from evenly spaced rows holding about
    ``sample`` values (thousands of 64-value NF4 blocks, so within a few percent): each block quantizes
    on its own, so a row subset quantizes like the full tensor (up to the double-quantized block scales)."""
    step = max(1, weight.shape[0] * weight[0].numel() // sample)
    rows = weight[::step]
    error = _distance(rows, nf4_roundtrip(rows, quant))
    return error * math.sqrt(weight.shape[0] / rows.shape[0])


def _distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2**20) -> float:
    """‖a − b‖_F in float32, ~``chunk`` elements at a time (no full-size temporary)."""
    rows = max(1, chunk // max(1, a[0].numel())) if a.ndim else 1
    total = 0.0
    for i in range(0, a.shape[0], rows):
        total += torch.linalg.vector_norm(a[i : i + rows].float() - b[i : i + rows].float()).item() ** 2
    return math.sqrt(total)


def grown_rows(weight: torch.Tensor, target: RowsTarget) -> torch.Tensor:
    """An embedding (or head) as the run computed with it, in float32: grown to ``target.size`` rows with the
    mean of the base's rows (``token_rows.resize_for``), then the trained rows put in place of theirs."""
    w = weight.float()
    if target.size > w.shape[0]:
        w = torch.cat([w, w.mean(0).expand(target.size - w.shape[0], -1)])
    if target.rows is not None:
        w.index_copy_(0, target.indices, target.rows.to(w.device))
    return w
