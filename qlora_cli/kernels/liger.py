"""Liger-Kernel's fused RMSNorm, RoPE and SwiGLU on a GPU, where the package is installed.

Liger patches the transformers modules of a loaded model in place. qlora keeps its own loss (fused
cross-entropy over target positions) and its own LoRA layers, so only the three elementwise kernels are
taken; the MLP's projections stay qlora's LoRA layers (Liger's SwiGLU MLP calls them as modules).
On a CPU, or without the package, nothing changes.
"""

from __future__ import annotations

import importlib
from typing import Any

from qlora_cli.errors import ConfigError


def apply_liger(model: Any, mode: str) -> bool:
    """Patch ``model`` with Liger kernels. ``mode``: "auto" (when usable), "true" (required), "false".

    Returns True when the kernels were applied."""
    if mode == "false":
        return False
    device = next(model.parameters()).device
    reason = None
    patch = None
    if device.type != "cuda":
        reason = "Liger kernels need a CUDA GPU"
    else:
        try:
            module = importlib.import_module("liger_kernel.transformers")
            patch = getattr(module, f"apply_liger_kernel_to_{model.config.model_type}", None)
            if patch is None:
                reason = f"Liger has no kernels for {model.config.model_type}"
        except ImportError:
            reason = "liger-kernel is not installed (pip install liger-kernel)"
    if patch is None:
        if mode == "true":
            raise ConfigError(f"liger_kernels: true, but {reason}")
        return False
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return True
