"""RMSNorm as one autograd node: ``y = w * (x * rsqrt(mean(x^2) + eps))``, in float32, cast back.

transformers' RMSNorm is five or more autograd nodes (pow, mean, rsqrt, two multiplies) running about twelve
elementwise passes forward and backward; this node runs about half as many (half the time on a SmolLM2-sized
norm on a CPU). It keeps x in its own dtype and one float per row (the reciprocal root mean square) and
recomputes the normalized input in backward. transformers' keeps a float32 copy of a bfloat16 or float16 x
(twice its bytes), and the normalized input too when the weight trains; in float32 with a frozen weight both
keep the same.

    x̂ = x r          r = rsqrt(mean(x^2) + eps)          y = w x̂
    dx = r (gw - x̂ mean(gw x̂))    with gw = g w          dw = Σ_rows g x̂

The statistics and the normalization run in float32, as in transformers' code. Two styles of the rest:
"llama" casts the normalized input back to x's dtype before the weight multiplies it (the product in the
promotion of both dtypes); "gemma" multiplies in float32 by ``offset + weight`` (Gemma's 1 + w, OLMo-2's plain w)
and casts the product.
"""

from __future__ import annotations

from typing import Any

import torch


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, style: str, offset: float) -> torch.Tensor:
        xf = x.float()
        rstd = _rstd(xf, eps)  # (..., 1) float32
        normed = torch.mul(xf, rstd)
        if style == "llama":  # x̂ back in x's dtype, then times the weight
            if x.dtype != torch.float32:
                normed = normed.to(x.dtype)
            out_dtype = torch.promote_types(weight.dtype, x.dtype)
            out = normed.mul_(weight) if out_dtype == normed.dtype else weight * normed
        else:  # the product in float32, then x's dtype
            out = normed.mul_(_scale(weight, offset)).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        ctx.style, ctx.offset = style, offset
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        x, rstd, weight = ctx.saved_tensors
        llama = ctx.style == "llama"
        xf = x.float()
        normed = torch.mul(xf, rstd)  # x̂, float32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            hat = normed if x.dtype == torch.float32 or not llama else normed.to(x.dtype)
            rows = grad_out.reshape(-1, grad_out.shape[-1])
            if not llama:
                rows = rows.float()
            grad_weight = torch.mul(rows, hat.reshape(rows.shape)).sum(0).to(weight.dtype)  # Σ_rows g x̂
        grad_x = None
        if ctx.needs_input_grad[0]:
            scale = weight if llama else _scale(weight, ctx.offset)
            gw = torch.mul(grad_out, scale, out=torch.empty_like(normed))  # float32 (grad_out, w: any dtypes)
            dot = torch.mul(gw, normed).sum(-1, keepdim=True).div_(x.shape[-1])  # mean(gw x̂) per row
            grad_x = gw.sub_(normed.mul_(dot)).mul_(rstd)
            if x.dtype != torch.float32:
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None, None, None


def _scale(weight: torch.Tensor, offset: float) -> torch.Tensor:
    """The float32 factor of the "gemma" style: ``offset + weight`` as transformers computes it."""
    return weight.float() + offset if offset else weight.float()


def _rstd(xf: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # transformers' own expression, to the bit


def fused_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, style: str = "llama", offset: float = 0.0
) -> torch.Tensor:
    return _FusedRMSNorm.apply(x, weight, eps, style, offset)
