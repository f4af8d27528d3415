"""One autograd node for a LoRA layer over a frozen (4-bit, 16-bit or Conv1D) base.

    y = x W^T + b + scaling * (x_l A^T) B^T        x_l = dropout(x)

Forward dequantizes the 4-bit weight into a reused buffer, does one matmul for the base and adds the
low-rank update with ``addmm``. Backward dequantizes again instead of keeping W: the only tensors saved
are the LoRA input ``x_l`` (N, in) and ``x_l A^T`` (N, r). Compared with separate modules (bitsandbytes'
MatMul4Bit + two nn.Linear + a scale + an add), this removes four autograd nodes and two passes over the
(N, out) output per layer, and under bf16 autocast keeps no float32 copy of the input.

The reference is ``LoRALinear``'s plain path (``fused=False``); tests check outputs and gradients equal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_buffers: dict[tuple, torch.Tensor] = {}
_no_out_variant: set[str] = set()


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor in ``dtype``.

    A 4-bit weight is dequantized into a buffer shared by every layer of that shape (it is consumed by one
    matmul and never saved), so a step allocates it once instead of once per layer and direction.
    """
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        w = weight.T if _is_conv1d(base) else weight  # Conv1D stores (in, out)
        return w.to(dtype)
    import bitsandbytes.functional as bnbf

    w = None
    if weight.device.type not in _no_out_variant:
        key = (tuple(quant_state.shape), quant_state.dtype, weight.device)
        buf = _buffers.get(key)
        if buf is None:
            buf = _buffers[key] = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=weight.device)
        try:
            w = bnbf.dequantize_4bit(weight.data, quant_state, out=buf)
        except NotImplementedError:  # bitsandbytes' CPU backend has no out= variant
            _no_out_variant.add(weight.device.type)
            _buffers.pop(key, None)
    if w is None:
        w = bnbf.dequantize_4bit(weight.data, quant_state)
    return w if w.dtype == dtype else w.to(dtype)


def _is_conv1d(base: nn.Module) -> bool:
    return type(base).__name__ == "Conv1D"


def compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the plain path would multiply in: autocast's when it is on, else the 4-bit layer's compute
    dtype, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return getattr(base, "compute_dtype", None) or x.dtype


class _FusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        base: nn.Module,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        # x: (N, in); x_lora: dropout(x), or None when there is no dropout (then it is x)
        xc = x.to(dtype)
        xlc = xc if x_lora is None else x_lora.to(dtype)
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        out = xc @ dense_weight(base, dtype).T  # (N, out)
        bias = getattr(base, "bias", None)
        if bias is not None:
            out += bias.to(dtype)
        xas = (xlc @ a.T).mul_(scaling)  # (N, r): the scaling is applied on the rank-r side, the cheap one
        out.addmm_(xas, b.T)
        ctx.save_for_backward(xlc, xas, lora_A, lora_B)
        ctx.base, ctx.scaling, ctx.dtype = base, scaling, dtype
        ctx.x_dtype = x.dtype
        ctx.x_lora_dtype = None if x_lora is None else x_lora.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        xlc, xas, lora_A, lora_B = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad_out.to(dtype)  # (N, out)
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        gbs = (g @ b).mul_(ctx.scaling)  # (N, r)
        grad_x = grad_x_lora = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ dense_weight(ctx.base, dtype)  # (N, in), through the frozen base
            if ctx.x_lora_dtype is None:
                grad_x.addmm_(gbs, a)  # no dropout: the adapter's input gradient lands in the same tensor
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.x_lora_dtype is not None and ctx.needs_input_grad[1]:
            grad_x_lora = (gbs @ a).to(ctx.x_lora_dtype)  # through the adapter, then dropout's backward
        if ctx.needs_input_grad[2]:
            grad_A = (gbs.T @ xlc).to(lora_A.dtype)  # (r, in)
        if ctx.needs_input_grad[3]:
            grad_B = (g.T @ xas).to(lora_B.dtype)  # (out, r)
        return grad_x, grad_x_lora, grad_A, grad_B, None, None, None


def fused_lora_linear(
    x: torch.Tensor, x_lora: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, base: nn.Module, scaling: float
) -> torch.Tensor:
    """base(x) + scaling * (x_lora A^T) B^T as one autograd node. x, x_lora: (..., in) -> (..., out).

    When ``x_lora`` is ``x`` (no dropout) both input gradients are written into one tensor.
    """
    dtype = compute_dtype(base, x)
    lead = x.shape[:-1]
    x_l = None if x_lora is x else x_lora.reshape(-1, x_lora.shape[-1])
    out = _FusedLoRA.apply(x.reshape(-1, x.shape[-1]), x_l, lora_A, lora_B, base, scaling, dtype)
    if getattr(base.weight, "quant_state", None) is not None:
        out = out.to(x.dtype)  # bitsandbytes' Linear4bit returns the input's dtype; so do we
    return out.reshape(*lead, out.shape[-1])
