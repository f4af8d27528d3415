"""The LoRA dropout mask, one draw for both paths: ``lora.LoRADropout`` (plain) and
``kernels.lora_linear.fused_lora_linear`` (fused) call the same function, so with the same generator state they
drop the same elements."""

from __future__ import annotations

import math

import torch


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of ``shape``, True where an element is dropped, independently, with probability
    ``dropout_rate(p, device)``.

    On a CPU the draw is 16-bit lanes of full-range 64-bit random words: one generator call per four
    elements, about three times faster than 16-bit draws and six times faster than a float Bernoulli (dropout
    was the largest cost after the matmuls in a CPU step). Elsewhere it is a Bernoulli draw into the mask.
    """
    if device.type == "cpu":
        n = math.prod(shape)
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
        lanes = words.view(torch.int16)[:n].view(shape)  # each uniform on [-32768, 32767]
        return lanes < _lane_threshold(p) - 32768
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(p)


def _lane_threshold(p: float) -> int:
    return min(math.ceil(p * 65536), 65535)


def dropout_rate(p: float, device: torch.device) -> float:
    """The probability ``dropout_mask`` really drops with: p itself, or on a CPU p rounded up to a multiple of
    2^-16. Kept elements are scaled by 1 / (1 - rate), so the expected value is exact whatever p is."""
    return _lane_threshold(p) / 65536 if device.type == "cpu" else p
