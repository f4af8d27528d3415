"""A SwiGLU MLP with LoRA on its three projections as one autograd node: ``down(silu(gate(x)) * up(x))``.

    G = x Wg^T + cg (mg * x) Ag^T Bg^T        U = x Wu^T + cu (mu * x) Au^T Bu^T
    h = silu(G) * U                            y = h Wd^T + cd (md * h) Ad^T Bd^T

The same arithmetic as three fused LoRA layers (``kernels.lora_linear``) with autograd's SiLU and product
between them, in the same dtypes, with the same dropout masks drawn in the same order (gate, up, down). What
changes is what is kept for backward: x (one copy for gate and up), G, U, the dropout masks and the rank-r
products. autograd keeps silu(G) and h as well, two more (tokens, intermediate) tensors per layer, the largest
activations of a decoder layer; backward recomputes them from G and U instead (two elementwise passes). The
input's gradient through gate and up is accumulated by the second matmul (``addmm``) instead of a separate add,
and the (tokens, intermediate) temporaries live in reused CPU slots (``_scratch``).
"""

from __future__ import annotations

from typing import Any

import torch

from qlora_cli.kernels import lora_linear  # dense_weight read through the module: the memory plan stands it in
from qlora_cli.kernels.dropout import dropout_mask, dropout_rate
from qlora_cli.kernels.lora_linear import (
    compute_dtype,
    dropped,
    lora_input_grad,
    lora_project,
    merged_weight,
    quant_state_of,
    shared_cast,
)


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        xc: torch.Tensor,
        drops: tuple,
        a_g: torch.Tensor,
        b_g: torch.Tensor,
        a_u: torch.Tensor,
        b_u: torch.Tensor,
        a_d: torch.Tensor,
        b_d: torch.Tensor,
        bases: tuple,
        scalings: tuple,
        dtype: torch.dtype,
        act_dtype: torch.dtype,
    ) -> torch.Tensor:
        # x: (N, hidden), differentiable; xc: x in the compute dtype, detached (shared_cast); drops: the three
        # bool masks (True: dropped) or None each; act_dtype: the dtype the plain path applies silu and * in
        drop_g, drop_u, drop_d = drops
        g, xas_g = lora_project(xc, drop_g, a_g, b_g, bases[0], scalings[0], dtype)
        u, xas_u = lora_project(xc, drop_u, a_u, b_u, bases[1], scalings[1], dtype)
        g, u = g.to(act_dtype), u.to(act_dtype)
        h = torch.ops.aten.silu.out(g, out=_scratch(0, g)).mul_(u)  # (N, intermediate): not saved
        out, xas_d = lora_project(h.to(dtype), drop_d, a_d, b_d, bases[2], scalings[2], dtype)
        del h
        ctx.save_for_backward(xc, g, u, xas_g, xas_u, xas_d, drop_g, drop_u, drop_d, a_g, b_g, a_u, b_u, a_d, b_d)
        ctx.bases, ctx.scalings, ctx.dtype, ctx.x_dtype = bases, scalings, dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        xc, g, u, xas_g, xas_u, xas_d, drop_g, drop_u, drop_d, a_g, b_g, a_u, b_u, a_d, b_d = ctx.saved_tensors
        dtype, (base_g, base_u, base_d), (s_g, s_u, s_d) = ctx.dtype, ctx.bases, ctx.scalings
        go = grad_out.to(dtype)  # (N, hidden)
        # down: its input's gradient dh, and its adapter's gradients (h recomputed for A's)
        gbs_d = (go @ b_d.to(dtype)).mul_(s_d)  # (N, r)
        w = lora_linear.dense_weight(base_d, dtype)
        merged = None if drop_d is not None else merged_weight(base_d, w, a_d, b_d, s_d, go.shape[0], w.shape[1])
        dh = torch.mm(go, w if merged is None else merged, out=_scratch(1, g, dtype))  # (N, intermediate)
        if drop_d is not None:
            dh += (gbs_d @ a_d.to(dtype)).masked_fill_(drop_d, 0.0)
        elif merged is None:
            dh.addmm_(gbs_d, a_d.to(dtype))
        dh = dh.to(g.dtype)
        silu = torch.ops.aten.silu.out(g, out=_scratch(0, g))
        h = torch.mul(silu, u, out=_scratch(2, g)).to(dtype)
        if drop_d is not None:
            h.masked_fill_(drop_d, 0.0)
        grad_a_d = (gbs_d.T @ h).to(a_d.dtype)  # (r, intermediate)
        del h
        grad_b_d = (go.T @ xas_d).to(b_d.dtype)  # (hidden, r)
        du = torch.mul(dh, silu, out=_scratch(2, g)).to(dtype)  # d/dU of silu(G) * U
        del silu
        dg = torch.ops.aten.silu_backward.grad_input(dh.mul_(u), g, grad_input=dh).to(dtype)  # d/dG, SiLU's kernel
        del dh
        # gate and up: the input's gradient from both in one tensor, the second matmul accumulating onto the first
        grad_x = None
        gbs_g = (dg @ b_g.to(dtype)).mul_(s_g)
        gbs_u = (du @ b_u.to(dtype)).mul_(s_u)
        if ctx.needs_input_grad[0]:
            grad_x = lora_input_grad(dg, gbs_g, a_g, b_g, s_g, drop_g, base_g, dtype)
            if dtype == ctx.x_dtype:  # the second matmul accumulates onto the first
                lora_input_grad(du, gbs_u, a_u, b_u, s_u, drop_u, base_u, dtype, out=grad_x)
            else:  # summed at the input's precision, as autograd sums two layers' gradients
                grad_u = lora_input_grad(du, gbs_u, a_u, b_u, s_u, drop_u, base_u, dtype)
                grad_x = grad_x.to(ctx.x_dtype).add_(grad_u.to(ctx.x_dtype))
        grad_a_g = (gbs_g.T @ dropped(xc, drop_g)).to(a_g.dtype)
        grad_a_u = (gbs_u.T @ dropped(xc, drop_u)).to(a_u.dtype)
        grad_b_g = (dg.T @ xas_g).to(b_g.dtype)
        grad_b_u = (du.T @ xas_u).to(b_u.dtype)
        return (
            grad_x, None, None, grad_a_g, grad_b_g, grad_a_u, grad_b_u, grad_a_d, grad_b_d, None, None, None, None
        )  # fmt: skip


_scratches: dict[tuple, torch.Tensor] = {}


def _scratch(slot: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor shaped as ``like`` for a temporary of the forward or backward (slot 0, 1, 2): on a CPU the same
    memory every call, grown as needed; elsewhere, and for tensor subclasses (the memory plan's fake tensors), a
    new one. Fresh memory is mapped page by page at every use; on some machines mapping a (tokens,
    intermediate) temporary cost several times the elementwise pass that fills it. The kernel's layers run
    one after another, so a slot is never in use twice at once."""
    dtype = dtype or like.dtype
    if like.device.type != "cpu" or type(like) is not torch.Tensor:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    key = (slot, dtype)
    buf = _scratches.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = _scratches[key] = torch.empty(like.numel(), dtype=dtype)
    return buf[: like.numel()].view(like.shape)


def fused_swiglu_mlp(x: torch.Tensor, layers: tuple, scalings: tuple, dropout: float = 0.0) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for three LoRA projections as one autograd node. x: (..., hidden).

    ``layers``: (lora_A, lora_B, base) for gate, up and down; ``scalings``: their LoRA scalings; ``dropout``:
    the probability (0 outside training), the masks drawn as ``fused_lora_linear`` draws them, in the plain
    path's order. The three bases must agree on 4-bit or not and on the compute dtype (``swiglu_supported``)."""
    (a_g, b_g, base_g), (a_u, b_u, base_u), (a_d, b_d, base_d) = layers
    dtype = compute_dtype(base_g, x)
    quantized = quant_state_of(base_g) is not None
    act_dtype = x.dtype if quantized else dtype  # where the plain path's silu and product run
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xc = shared_cast(x, dtype).reshape(x2.shape)
    intermediate = a_d.shape[1]
    drops: tuple = (None, None, None)
    keep = 1.0
    if dropout > 0:
        shapes = (x2.shape, x2.shape, (x2.shape[0], intermediate))
        drops = tuple(dropout_mask(shape, dropout, x.device) for shape in shapes)
        keep = 1.0 / (1.0 - dropout_rate(dropout, x.device))
    bases = (base_g, base_u, base_d)
    scaled = tuple(s * keep for s in scalings)
    out = _FusedSwiGLU.apply(x2, xc, drops, a_g, b_g, a_u, b_u, a_d, b_d, bases, scaled, dtype, act_dtype)
    if quantized and out.dtype != act_dtype:
        out = out.to(act_dtype)  # bitsandbytes' Linear4bit returns its input's dtype; so does the plain path
    return out.reshape(*lead, out.shape[-1])


def swiglu_supported(x: torch.Tensor, bases: tuple) -> bool:
    """Whether ``fused_swiglu_mlp`` computes what the plain path does for these three base layers: all 4-bit or
    all dense (not Conv1D), one compute dtype."""
    kinds = {quant_state_of(b) is not None for b in bases}
    if len(kinds) != 1 or any(type(b).__name__ == "Conv1D" for b in bases):
        return False
    return len({compute_dtype(b, x) for b in bases}) == 1
