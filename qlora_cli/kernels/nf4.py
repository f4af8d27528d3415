"""dequant(quant(W)) for 4-bit NF4 / FP4 on a CPU: bitsandbytes' values, eight to ten times faster.

``qlora merge`` (default mode) and its NF4-error report need, for every targeted weight, the exact values the
4-bit base held in training. bitsandbytes' CPU quantizer finds each value's code with ``torch.bucketize`` (a
binary search per element) and packs nibbles that are unpacked again right away; that search was most of a
CPU merge's time. Here the code is found with a lookup table instead, and nothing is packed:

1. per block of 64: ``absmax`` and ``x = clamp(w * (1 / absmax), -1, 1)``, computed exactly as bitsandbytes does;
2. ``y = x + c`` lands in [4, 8), where float32 spacing is uniform, so the top bits of ``y`` name a cell of
   width 2^-10 (or finer); each cell holds at most one decision boundary (a midpoint between two codes),
   never within a few ulps of the cell's edges (checked when the table is built);
3. ``code = VALUE[2 * cell + (x > BOUNDARY[2 * cell])]``: two table lookups and one exact comparison on ``x``
   itself, so the rounding of ``y`` can move an element to a neighbouring cell but never change its code;
4. double quantization of ``absmax`` and the final ``code * absmax`` go through bitsandbytes' own functions
   and formula (float32 product, then the output dtype).

Steps 1-3 and the final product run over chunks of 2^18 elements in reused buffers, so every temporary stays in
the CPU caches (a 5632 x 2048 bf16 weight: 0.04 s on one core, bitsandbytes 0.39 s).

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
    """(offset c, shift S, BOUNDARY, VALUE) for ``quant_type``. Cell k is ``(bits(x + c) - bits(4.0)) >> S``;
    BOUNDARY[2k] is the boundary inside cell k (else +inf) and VALUE[2k + (x > BOUNDARY[2k])] the code value."""
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
    cells = (1 << 23) >> shift  # y in [4, 8): 2^23 float32 values, 2^S to a cell
    boundary = [math.inf] * (2 * cells)
    value = [0.0] * (2 * cells)
    for k in range(cells):
        lo_y = 4.0 + k * width
        below = sum(1 for b in bounds if b + c < lo_y)
        inside = [b for b in bounds if lo_y <= b + c < lo_y + width]
        value[2 * k] = code[min(below, len(code) - 1)].item()
        if inside:
            boundary[2 * k] = inside[0]
            value[2 * k + 1] = code[below + 1].item()
    return c, shift, torch.tensor(boundary, dtype=torch.float32), torch.tensor(value, dtype=torch.float32)


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


def _code_values(x: torch.Tensor, quant_type: str, scratch: _Scratch | None = None) -> torch.Tensor:
    """The code value each element of ``x`` (float32, in [-1, 1]) rounds to: ``sorted_code[bucketize(x)]``."""
    c, shift, boundary, value = _tables(quant_type)
    s = scratch or _Scratch(x.numel())
    n = x.numel()
    flat = x.reshape(-1)
    index = torch.add(flat, c, out=s.y[:n]).view(torch.int32)  # y = x + c in [4, 8], then its bits
    index.sub_(_BINADE_BITS).bitwise_right_shift_(shift - 1).bitwise_and_(-2)  # 2 * cell
    torch.index_select(boundary, 0, index, out=s.bound[:n])
    index += torch.gt(flat, s.bound[:n], out=s.above[:n])
    return torch.index_select(value, 0, index, out=s.value[:n]).view(x.shape)


class _Scratch:
    """Reused buffers for one chunk: a large merge then allocates (and page-faults) nothing per chunk."""

    def __init__(self, n: int):
        self.scaled = torch.empty(n, dtype=torch.float32)
        self.y = torch.empty(n, dtype=torch.float32)
        self.bound = torch.empty(n, dtype=torch.float32)
        self.above = torch.empty(n, dtype=torch.bool)
        self.value = torch.empty(n, dtype=torch.float32)


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


CHUNK = 2**18  # elements per step: the temporaries (about 4.5 MB) stay in the CPU caches


def roundtrip_4bit(
    weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = 64, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``dequantize_4bit(quantize_4bit(weight, blocksize, double_quant, quant_type))`` computed on a CPU without
    packing: the same values in ``weight``'s dtype and shape (see the module docstring). ``out_dtype`` (e.g.
    float32) returns those values converted chunk by chunk, saving a pass over the whole tensor."""
    import bitsandbytes.functional as bnbf

    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = _block_absmax(blocks)
    rest = flat[full:].float()  # the last, short block (often empty)
    if rest.numel():
        absmax = torch.cat([absmax, rest.abs().max().view(1)])
    if not absmax.isfinite().all():  # inf or NaN weights, e.g. a float32 checkpoint overflowing float16
        packed, state = bnbf.quantize_4bit(
            weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        out = bnbf.dequantize_4bit(packed, state)  # bitsandbytes' own arithmetic: NaN where it gives NaN
        return out if out_dtype is None else out.to(out_dtype)
    inverse = 1.0 / absmax[: blocks.shape[0]].clamp(min=1e-38)
    tail = None
    if rest.numel():  # bitsandbytes divides here instead of multiplying by the reciprocal
        tail = _code_values(torch.clamp(rest / absmax[-1].clamp(min=1e-38), -1, 1), quant_type)
    if double_quant:
        offset = absmax.mean()
        q, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        absmax = bnbf.dequantize_blockwise(q, state2)
        absmax += offset
        absmax = absmax.float()
    out = torch.empty(n, dtype=out_dtype or weight.dtype)
    out_blocks = out[:full].view(-1, blocksize)
    rounded = None if out.dtype == weight.dtype else torch.empty(CHUNK // blocksize * blocksize, dtype=weight.dtype)
    scale = absmax[: blocks.shape[0]]
    rows = max(1, CHUNK // blocksize)
    scratch = _Scratch(min(rows, blocks.shape[0]) * blocksize)
    for start in range(0, blocks.shape[0], rows):
        chunk = blocks[start : start + rows]
        k = chunk.numel()
        # a 16-bit weight times a float32 scale multiplies in float32, as bitsandbytes' A.float() * (1 / absmax)
        scaled = torch.mul(chunk, inverse[start : start + rows, None], out=scratch.scaled[:k].view(chunk.shape))
        values = _code_values(scaled.clamp_(-1, 1), quant_type, scratch)
        if rounded is None:
            torch.mul(values, scale[start : start + rows, None], out=out_blocks[start : start + rows])
        else:  # the product rounds to the weight's dtype first, as bitsandbytes returns it
            product = torch.mul(values, scale[start : start + rows, None], out=rounded[:k].view(chunk.shape))
            out_blocks[start : start + rows].copy_(product)
    if tail is not None:
        out[full:] = (tail * absmax[-1]).to(weight.dtype)
    return out.view(weight.shape)
