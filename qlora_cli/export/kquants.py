"""llama.cpp's K-quants Q4_K and Q6_K, written in numpy: the ``gguf`` package reads them but cannot write them,
and Q4_K_M (Q4_K with Q6_K where it matters most) is the type most GGUF models are shipped in.

Block layouts (256 weights per block, as ggml's ``block_q4_K`` / ``block_q6_K``, and as ``gguf.quants``
dequantizes them, which the tests use to read them back):

    Q4_K  144 bytes: d, dmin (f16); 12 bytes of eight 6-bit scales and eight 6-bit mins (one per 32 weights);
          128 bytes of 4-bit values. weight = d * scale_j * q - dmin * min_j
    Q6_K  210 bytes: 128 bytes of low 4 bits, 64 bytes of high 2 bits, sixteen int8 scales (one per 16
          weights), d (f16). weight = d * scale_b * (q - 32)

Q4_K's scales and mins are searched as ggml's reference quantizer searches them (``_fit_scale_min``); Q6_K's
scale maps each sub-block's largest weight onto the grid, without ggml's refinement.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} values, got {x.shape[-1]}")
    return x.reshape(-1, QK_K)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """``x`` (..., n·256) as Q4_K blocks: uint8 of shape (..., n·144)."""
    shape = x.shape
    b = _blocks(x).reshape(-1, 8, 32)  # (blocks, sub-blocks, 32)
    scale, mins = _fit_scale_min(b, 15)  # (blocks, 8) each; weight ~ scale * q - mins
    max_scale, max_min = scale.max(-1, keepdims=True), mins.max(-1, keepdims=True)
    ls = np.minimum(63, np.rint(_safe_div(63.0 * scale, max_scale))).astype(np.uint8)
    lm = np.minimum(63, np.rint(_safe_div(63.0 * mins, max_min))).astype(np.uint8)
    d = (max_scale / 63.0).astype(np.float16)
    dmin = (max_min / 63.0).astype(np.float16)
    step = d.astype(np.float32) * ls  # (blocks, 8)
    offset = dmin.astype(np.float32) * lm
    q = np.clip(np.rint(_safe_div(b + offset[..., None], step[..., None])), 0, 15).astype(np.uint8)

    # scales: bytes 0-3 scale j (6 bits) + top bits of scale j+4; 4-7 min j + top bits of min j+4;
    # 8-11 low nibbles of scale j+4 and min j+4
    packed = np.empty((b.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (ls[:, :4] & 0x3F) | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (lm[:, :4] & 0x3F) | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    # values: per 64 weights, 32 bytes: weight l in the low nibble, weight l + 32 in the high one
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def _fit_scale_min(b: np.ndarray, nmax: int, steps: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (last axis), the (scale, min) of ``scale * q - min`` with q in 0..nmax that minimises the
    squared error weighted by (rms + |x|), as ggml's make_qkx2_quants searches it: the range mapped onto the
    grid, then grids stretched by -1 to +1 levels, each refitted by weighted least squares, the best kept.
    ggml tries 21 stretches; ``steps + 1`` = 5 get most of the gain (relative RMS error on normal weights:
    7.57% with none, 7.27% with 5, 7.20% with 21) at a quarter of the time."""
    w = np.sqrt((b * b).mean(-1, keepdims=True)) + np.abs(b)
    lo = np.minimum(b.min(-1, keepdims=True), 0.0)
    span = b.max(-1, keepdims=True) - lo
    shifted = b - lo
    sw, sx, sx2 = w.sum(-1, keepdims=True), (w * b).sum(-1, keepdims=True), (w * b * b).sum(-1, keepdims=True)

    def error(s: np.ndarray, m: np.ndarray, sl: np.ndarray, sl2: np.ndarray, sxl: np.ndarray) -> np.ndarray:
        # sum of w * (s*q + m - x)^2, expanded into the sums already taken (no pass over the weights)
        return s * s * sl2 + 2 * s * m * sl - 2 * s * sxl + m * m * sw - 2 * m * sx + sx2

    scale = span / nmax
    q = np.clip(np.rint(_safe_div(shifted, scale)), 0, nmax)
    wq = w * q
    best = error(scale, lo, wq.sum(-1, keepdims=True), (wq * q).sum(-1, keepdims=True), (wq * b).sum(-1, keepdims=True))
    offset = lo.copy()
    for step in range(steps + 1):
        iscale = _safe_div(np.full_like(span, -1.0 + 2.0 * step / steps + nmax), span)
        q = np.clip(np.rint(iscale * shifted), 0, nmax)
        wq = w * q
        sl, sl2, sxl = wq.sum(-1, keepdims=True), (wq * q).sum(-1, keepdims=True), (wq * b).sum(-1, keepdims=True)
        det = sw * sl2 - sl * sl
        this_scale = _safe_div(sw * sxl - sx * sl, det)
        this_min = _safe_div(sl2 * sx - sl * sxl, det)
        positive = this_min > 0  # the offset may only lower the weights (min <= 0), as ggml's
        this_min = np.where(positive, 0.0, this_min)
        this_scale = np.where(positive, _safe_div(sxl, sl2), this_scale)
        err = error(this_scale, this_min, sl, sl2, sxl)
        better = (det > 0) & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        offset = np.where(better, this_min, offset)
    return scale[..., 0], -offset[..., 0]


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """``x`` (..., n·256) as Q6_K blocks: uint8 of shape (..., n·210)."""
    shape = x.shape
    b = _blocks(x).reshape(-1, 16, 16)  # (blocks, sub-blocks, 16)
    # each sub-block's largest-magnitude weight maps to -32 (its sign kept in the scale)
    idx = np.abs(b).argmax(-1)
    peak = np.take_along_axis(b, idx[..., None], -1)[..., 0]  # (blocks, 16)
    scale = peak / -32.0
    j = np.abs(scale).argmax(-1)
    max_scale = np.take_along_axis(scale, j[:, None], -1)  # (blocks, 1), signed
    iscale = _safe_div(np.full_like(max_scale, -128.0), max_scale)
    d = _safe_div(np.ones_like(iscale), iscale).astype(np.float16)
    sc = np.clip(np.rint(iscale * scale), -128, 127).astype(np.int8)
    step = d.astype(np.float32) * sc.astype(np.float32)  # (blocks, 16)
    q = (np.clip(np.rint(_safe_div(b, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)

    # per 128 weights (a half): 64 bytes of low nibbles (rows 0-1 low, rows 2-3 high) and 32 bytes of high
    # 2-bit pairs (row t at bits 2t)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, 0:2, :].reshape(-1, 2, 64) | (low[:, :, 2:4, :].reshape(-1, 2, 64) << 4)).reshape(-1, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 210)


def in_threads(quantize: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``quantize`` over blocks of rows in one thread per CPU (numpy leaves the GIL in its loops); rows are
    quantized independently, so the bytes are the same as in one call."""

    def run(x: np.ndarray) -> np.ndarray:
        workers = min(os.cpu_count() or 1, 8)
        if x.ndim != 2 or workers == 1 or x.shape[0] < 2 * workers:
            return quantize(x)
        with ThreadPoolExecutor(workers, thread_name_prefix="qlora-kquant") as pool:
            return np.concatenate(list(pool.map(quantize, np.array_split(x, workers))))

    return run


QUANTIZERS = {"Q4_K": in_threads(quantize_q4_k), "Q6_K": in_threads(quantize_q6_k)}
