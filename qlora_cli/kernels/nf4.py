"""dequant(quant(W)) for 4-bit NF4 / FP4 on a CPU, bit-identical to bitsandbytes and about twice as fast.

``qlora merge`` (default mode) and its NF4-error report need, for every targeted weight, the exact values the
4-bit base held in training. bitsandbytes' CPU quantizer finds each value's code with ``torch.bucketize`` (a
binary search per element) and packs nibbles that are unpacked again right away; that search was most of a
CPU merge's time. Here the code is found with a lookup table instead, and nothing is packed:

1. per block of 64: ``absmax`` and ``x = clamp(w * (1 / absmax), -1, 1)``, computed exactly as bitsandbytes does;
2. ``y = x + c`` lands in [4, 8), where float32 spacing is uniform, so the top bits of ``y`` name a cell of
   width 2^-10 (or finer); each cell holds at most one decision boundary (a midpoint between two codes),
   never within a few ulps of the cell's edges (checked when the table is built);
3. ``code = VALUE[2 * cell + (x > BOUNDARY[cell])]``: two table lookups and one exact comparison on ``x``
   itself, so the rounding of ``y`` can move an element to a neighbouring cell but never change its code;
4. double quantization of ``absmax`` and the final ``code * absmax`` go through bitsandbytes' own functions
   and formula (float32 product, then the output dtype).

Tests compare the output with ``dequantize_4bit(quantize_4bit(W))`` from bitsandbytes for both types, with and
without double quantization, in float32, bfloat16 and float16, including a short last block: every bit is the
same except, for FP4, the sign of some zeros (FP4 has a +0 and a -0 code; bitsandbytes' own CPU kernels do not
agree on which small values get which). W + delta and every norm are the same either way.

On a GPU, merge uses bitsandbytes' CUDA quantizer instead. Its NF4 thresholds (decimal literals in
kernels.cu) round to exactly these float32 midpoints, so NF4 agrees bit for bit across devices; its FP4
thresholds are shorter decimals a few float32 steps off, so an FP4 run trained on a GPU and merged on a CPU
can differ in the rare weights that fall in between.
"""

from __future__ import annotations

import math
from functools import cache

import torch

_BINADE_BITS = 0x40800000  # float32 bit pattern of 4.0: y in [4, 8) has spacing 2^-21


def _sorted_code(quant_type: str) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return torch.sort(get_4bit_type(quant_type, device="cpu").float())[0]


@cache
def _tables(quant_type: str) -> tuple[float, int, torch.Tensor, torch.Tensor]:
    """(offset c, shift S, BOUNDARY, VALUE) for ``quant_type``. Cell k is ``bits(x + c) >> S``; both tables are
    indexed by ``2k`` (BOUNDARY: the boundary inside cell k, else +inf) and VALUE by ``2k + (x > boundary)``."""
    code = _sorted_code(quant_type)
    bounds = ((code[:-1] + code[1:]) / 2).tolist()  # float32 midpoints, as bitsandbytes computes them
    ulp = 2.0**-21
    for shift in (11, 10, 9, 8):
        width = ulp * 2**shift
        for j in range(1, 16):
            c = 6.0 + width * j / 16  # exactly representable in float32
            if _cells_ok(bounds, c, width, margin=8 * ulp):
                break
        else:
            continue
        break
    else:  # pragma: no cover - the codes of bitsandbytes 0.49/0.50 fit at the first shift
        raise RuntimeError(f"no lookup table fits the {quant_type} code")
    first, end = _BINADE_BITS >> shift, (2 * _BINADE_BITS >> shift) + 1  # cells of y in [4, 8]
    boundary = torch.full((2 * end,), math.inf)
    value = torch.zeros(2 * end)
    for k in range(first, end):
        lo_y = 4.0 + (k - first) * width
        below = sum(1 for b in bounds if b + c < lo_y)
        inside = [b for b in bounds if lo_y <= b + c < lo_y + width]
        value[2 * k] = code[min(below, len(code) - 1)]
        if inside:
            boundary[2 * k] = inside[0]
            value[2 * k + 1] = code[below + 1]
    return c, shift, boundary, value


def _cells_ok(bounds: list[float], c: float, width: float, margin: float) -> bool:
    seen: set[int] = set()
    for b in bounds:
        y = b + c  # exact in float64: b is a float32 in [-1, 1], c has few significant bits
        k = math.floor((y - 4.0) / width)
        edge_distance = min(y - (4.0 + k * width), 4.0 + (k + 1) * width - y)
        if k in seen or edge_distance < margin:
            return False
        seen.add(k)
    return True


def _code_values(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The code value each element of ``x`` (float32, in [-1, 1]) rounds to: ``sorted_code[bucketize(x)]``."""
    c, shift, boundary, value = _tables(quant_type)
    index = torch.add(x, c).view(torch.int32).bitwise_right_shift_(shift - 1).bitwise_and_(-2)  # 2 * cell
    index += torch.gt(x, boundary.index_select(0, index.view(-1)).view(x.shape))
    return value.index_select(0, index.view(-1)).view(x.shape)


_BITS = {
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
}


def _block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks.abs().amax(dim=1)`` in float32, from the magnitude bits: for IEEE floats without the sign bit,
    integer order is value order, so this is exact (NaN included) and skips a full-size float temporary."""
    bits, magnitude = _BITS[blocks.dtype]
    top = (blocks.view(bits) & magnitude).amax(dim=1)
    return top.view(blocks.dtype).float()


def roundtrip_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = 64) -> torch.Tensor:
    """``dequantize_4bit(quantize_4bit(weight, blocksize, double_quant, quant_type))`` computed on a CPU without
    packing: the same values, bit for bit, in ``weight``'s dtype and shape."""
    import bitsandbytes.functional as bnbf

    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = _block_absmax(blocks)
    # a 16-bit weight times a float32 scale multiplies in float32, as bitsandbytes' A.float() * (1 / absmax)
    scaled = torch.mul(blocks, (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1)
    values = _code_values(scaled, quant_type)  # (blocks, blocksize)
    del scaled
    tail = None
    if full < n:  # the last, short block: bitsandbytes divides here instead of multiplying by the reciprocal
        rest = flat[full:].float()
        am = rest.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        tail = _code_values(torch.clamp(rest / am, -1, 1), quant_type)
    if double_quant:
        offset = absmax.mean()
        q, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        absmax = bnbf.dequantize_blockwise(q, state2)
        absmax += offset
        absmax = absmax.float()
    out = torch.empty(n, dtype=weight.dtype)
    torch.mul(values, absmax[: values.shape[0]].view(-1, 1), out=out[:full].view(-1, blocksize))
    if tail is not None:
        out[full:] = tail * absmax[-1]
    return out.view(weight.shape)
