"""One autograd node for a LoRA layer over a frozen (4-bit, 16-bit or Conv1D) base, dropout included.

    y = x W^T + b + c * ((m * x) A^T) B^T        m: the dropout keep-mask, c = scaling / (1 - p)

Forward dequantizes the 4-bit weight into a reused buffer, does one matmul for the base and adds the
low-rank update with ``addmm``; dropout's 1 / (1 - p) rides on the rank-r side with the scaling. Backward
dequantizes again instead of keeping W. Saved: the input in the compute dtype (one tensor for all the
adapters that read the same hidden state, e.g. q, k and v: ``shared_cast``), a one-byte drop mask per adapter
when dropout is on, and ``x_l A^T`` (N, r). Compared with separate modules (bitsandbytes' MatMul4Bit, a
dropout, two nn.Linear, a scale and an add), this removes six autograd nodes and several passes over (N, in)
or (N, out) tensors per layer. For q, k and v the saved input costs 2 + 3 bytes per element under bf16
autocast and 4 + 3 in float32, where a dropped copy per adapter would cost 3 x 2 and 3 x 4.

The reference is ``LoRALinear``'s plain path (``fused=False``): the same mask is drawn from the same
generator, and tests check outputs and gradients equal.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from qlora_cli.kernels.dropout import dropout_mask, dropout_rate

_buffers: dict[tuple, torch.Tensor] = {}
_no_out_variant: set[str] = set()


def quant_state_of(base: nn.Module) -> Any:
    """A 4-bit layer's quantization state: on its weight, or (under FSDP2, whose gathered weight is a plain
    tensor of the packed bytes) on the bitsandbytes layer itself; None for a dense layer."""
    state = getattr(base.weight, "quant_state", None)
    if state is None and getattr(base, "quant_state", None) is not None and base.weight.shape[-1] == 1:
        state = base.quant_state
    return state


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor in ``dtype``.

    A 4-bit weight is dequantized into a buffer shared by every layer of that shape (it is consumed by one
    matmul and never saved), so a step allocates it once instead of once per layer and direction.
    """
    weight = base.weight
    quant_state = quant_state_of(base)
    if quant_state is None:
        w = weight.T if _is_conv1d(base) else weight  # Conv1D stores (in, out)
        return w.to(dtype)
    import bitsandbytes.functional as bnbf

    w = _cpu_dequantize(weight, quant_state) if weight.device.type == "cpu" else None
    if w is None and weight.device.type not in _no_out_variant:
        try:
            w = bnbf.dequantize_4bit(weight.data, quant_state, out=_shared_buffer(quant_state, weight.device))
        except NotImplementedError:  # bitsandbytes' CPU backend has no out= variant
            _no_out_variant.add(weight.device.type)
            _buffers.pop((tuple(quant_state.shape), quant_state.dtype, weight.device), None)
    if w is None:
        w = bnbf.dequantize_4bit(weight.data, quant_state)
    return w if w.dtype == dtype else w.to(dtype)


def _shared_buffer(quant_state: Any, device: torch.device) -> torch.Tensor:
    """The dequantization buffer every 4-bit weight of this shape and dtype on ``device`` shares."""
    key = (tuple(quant_state.shape), quant_state.dtype, device)
    buf = _buffers.get(key)
    if buf is None:
        buf = _buffers[key] = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=device)
    return buf


def _cpu_dequantize(weight: torch.Tensor, quant_state: Any) -> torch.Tensor | None:
    """bitsandbytes' own CPU kernel for a 4-bit weight, writing into the shared buffer of its shape, with the
    double-quantized block scales dequantized once per weight (the base is frozen) instead of at every call.
    The same values as ``dequantize_4bit``; None where that kernel does not apply (then it runs as usual).

    bitsandbytes' CPU backend allocates a fresh output at each call (it has no ``out=`` variant) and dequantizes
    the scales again: in a decode step, where each weight is read for a handful of rows, that was a third of
    the dequantization's time."""
    kernel = _cpu_kernel(quant_state)
    if getattr(quant_state, "packing_format_for_cpu", False):  # bitsandbytes repacked it for its AVX-512 kernel
        return None
    if kernel is None or len(quant_state.shape) != 2 or quant_state.shape[-1] % 2 or not weight.is_contiguous():
        return None
    cached = getattr(quant_state, "_qlora_absmax", None)
    if cached is None or cached[0] is not quant_state.absmax:  # a re-quantized weight brings a new absmax
        absmax = quant_state.absmax
        if quant_state.nested:
            import bitsandbytes.functional as bnbf

            absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
        cached = (quant_state.absmax, absmax.float().contiguous())
        quant_state._qlora_absmax = cached
    import ctypes

    buf = _shared_buffer(quant_state, weight.device)
    packed = weight.data.view(torch.uint8) if weight.dtype != torch.uint8 else weight.data
    rows, cols = quant_state.shape
    kernel(
        ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(cached[1].data_ptr()), ctypes.c_void_p(buf.data_ptr()),
        ctypes.c_longlong(quant_state.blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(cols),
    )  # fmt: skip
    return buf


def _cpu_kernel(quant_state: Any) -> Any:
    """bitsandbytes' C function that dequantizes this weight on a CPU, or None (another type, a block size its
    AVX-512 kernel mishandles, a bitsandbytes without it)."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(quant_state.dtype)
    if name is None or quant_state.quant_type not in ("nf4", "fp4") or quant_state.blocksize >= 2048:
        return None
    try:
        from bitsandbytes.cextension import lib
    except ImportError:  # pragma: no cover - bitsandbytes without its C library
        return None
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_state.quant_type}_{name}", None)


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x)`` for inference; a 4-bit layer on a CPU dequantizes through ``dense_weight`` (the reused buffer,
    the scales dequantized once) and multiplies as bitsandbytes does: in its compute dtype, back to x's dtype."""
    if x.device.type != "cpu" or quant_state_of(base) is None or torch.is_grad_enabled():
        return base(x)
    dtype = compute_dtype(base, x)
    bias = None if base.bias is None else base.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), dense_weight(base, dtype), bias).to(x.dtype)


def _is_conv1d(base: nn.Module) -> bool:
    return type(base).__name__ == "Conv1D"


def compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the plain path would multiply in: autocast's when it is on, else the 4-bit layer's compute
    dtype, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return getattr(base, "compute_dtype", None) or x.dtype


def dropped(x: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """x with dropout's zeros (``drop``: True where dropped), or x itself without dropout."""
    return x if drop is None else torch.where(drop, 0.0, x)


def merged_weight(
    base: nn.Module, w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, rows: int, side: int
) -> torch.Tensor | None:
    """W + s B A (out, in) from the dense weight ``w``, where multiplying by it once replaces the rank-r update's
    pass over a (rows, side) tensor: ``side`` is out for the output, in for the input's gradient, so this pays
    where rows exceed the weight's other dimension. On a CPU in float32 only: in bf16, or in TF32 on a GPU, the
    small update would round away against W (and a GPU does the rank-r pass at little cost). None otherwise.
    The shared 4-bit dequantization buffer (or a fresh dequantized copy) takes the update in place; a dense weight
    is never written, a new tensor is made."""
    if w.dtype != torch.float32 or w.device.type != "cpu" or rows * side <= w.numel():
        return None
    b, a = lora_B.to(w.dtype), lora_A.to(w.dtype)
    if quant_state_of(base) is not None:
        return w.addmm_(b, a, alpha=scaling)
    return torch.addmm(w, b, a, alpha=scaling)


def lora_project(
    xc: torch.Tensor, drop: Any, lora_A: torch.Tensor, lora_B: torch.Tensor, base: nn.Module, scaling: float, dtype: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + bias + s (m x) A^T B^T, s (m x) A^T) in ``dtype``: a LoRA layer's forward, (N, out) and (N, r).

    Without dropout, in float32 on a CPU, with more rows than input features, the update rides in the base
    matmul: x (W + s B A)^T, one pass over W instead of one over the (N, out) output (``merged_weight``)."""
    w = dense_weight(base, dtype)
    xas = (dropped(xc, drop) @ lora_A.to(dtype).T).mul_(scaling)  # scaling on the rank-r side, the cheap one
    merged = None if drop is not None else merged_weight(base, w, lora_A, lora_B, scaling, xc.shape[0], w.shape[0])
    out = xc @ (w if merged is None else merged).T  # (N, out)
    bias = getattr(base, "bias", None)
    if bias is not None:
        out += bias.to(dtype)
    if merged is None:
        out.addmm_(xas, lora_B.to(dtype).T)
    return out, xas


def lora_input_grad(
    g: torch.Tensor,
    gbs: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    drop: Any,
    base: nn.Module,
    dtype: Any,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A LoRA layer's input gradient (N, in) from its output's, g, and gbs = s g B: through the frozen base plus
    the adapter's part (through the dropout) in the same tensor, accumulated by the matmul. ``out``: a
    gradient to add it to (in place), else a new tensor. Without dropout the adapter's part rides in the base
    matmul where that pays (``merged_weight``): g (W + s B A)."""
    w, a = dense_weight(base, dtype), lora_A.to(dtype)
    merged = None if drop is not None else merged_weight(base, w, lora_A, lora_B, scaling, g.shape[0], w.shape[1])
    if merged is not None:
        return g @ merged if out is None else out.addmm_(g, merged)
    if drop is None:
        return (g @ w if out is None else out.addmm_(g, w)).addmm_(gbs, a)
    update = torch.where(drop, 0.0, gbs @ a)
    return torch.addmm(update, g, w) if out is None else out.addmm_(g, w).add_(update)


class _FusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        xc: torch.Tensor,
        drop: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        base: nn.Module,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        # x: (N, in), the differentiable input (its gradient is returned in its own dtype, so adapters sharing
        # it are summed at its precision); xc: x in the compute dtype, detached, possibly shared (shared_cast);
        # drop: (N, in) bool, True where dropout zeroes the adapter's input, or None;
        # scaling: the LoRA scaling times dropout's 1 / (1 - p)
        out, xas = lora_project(xc, drop, lora_A, lora_B, base, scaling, dtype)
        ctx.save_for_backward(xc, drop, xas, lora_A, lora_B)
        ctx.base, ctx.scaling, ctx.dtype, ctx.x_dtype = base, scaling, dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        xc, drop, xas, lora_A, lora_B = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad_out.to(dtype)  # (N, out)
        gbs = (g @ lora_B.to(dtype)).mul_(ctx.scaling)  # (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = lora_input_grad(g, gbs, lora_A, lora_B, ctx.scaling, drop, ctx.base, dtype).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:  # the dropped input recomputed: one byte per element saved
            grad_A = (gbs.T @ dropped(xc, drop)).to(lora_A.dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_B = (g.T @ xas).to(lora_B.dtype)  # (out, r)
        return grad_x, None, None, grad_A, grad_B, None, None, None


def fused_lora_linear(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base: nn.Module,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """base(x) + scaling * (dropout(x) A^T) B^T as one autograd node. x: (..., in) -> (..., out).

    ``dropout`` is the probability (0 outside training); the mask comes from ``kernels.dropout.dropout_mask``, the
    same draw as ``LoRADropout``.
    """
    dtype = compute_dtype(base, x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xc = shared_cast(x, dtype).reshape(x2.shape)
    drop, keep_scale = None, 1.0
    if dropout > 0:
        drop = dropout_mask(x2.shape, dropout, x.device)
        keep_scale = 1.0 / (1.0 - dropout_rate(dropout, x.device))
    out = _FusedLoRA.apply(x2, xc, drop, lora_A, lora_B, base, scaling * keep_scale, dtype)
    if quant_state_of(base) is not None and out.dtype != x.dtype:
        out = out.to(x.dtype)  # bitsandbytes' Linear4bit returns the input's dtype; so do we
    return out.reshape(*lead, out.shape[-1])


_last_cast: tuple | None = None  # (weakref to the input, its version, dtype, weakref to the cast)


def shared_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.detach().to(dtype)``, one tensor for consecutive adapters reading the same input (q, k and v; gate and
    up), which saves it for backward once instead of once per adapter.

    Under bf16 autocast the norms' outputs are float32. Detached: gradients still flow to ``x`` itself, in its
    dtype, so the adapters' contributions are summed at x's precision. Weak references only: nothing is kept
    alive here; an in-place change to x (its version) or another tensor misses the cache."""
    global _last_cast
    if x.dtype == dtype:
        return x.detach()
    if not torch.is_grad_enabled() or x.is_inference():
        return x.detach().to(dtype)
    last = _last_cast
    if last is not None and last[0]() is x and last[1] == x._version and last[2] == dtype:
        cast = last[3]()
        if cast is not None:
            return cast
    cast = x.detach().to(dtype)
    _last_cast = (weakref.ref(x), x._version, dtype, weakref.ref(cast))
    return cast
