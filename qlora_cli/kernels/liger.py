"""Liger-Kernel's fused RMSNorm, RoPE and SwiGLU on a GPU, where the package is installed.

Liger patches the transformers modules of a loaded model in place. qlora keeps its own loss (fused
cross-entropy over target positions) and its own LoRA layers, so only the three elementwise kernels are
taken; the MLP's projections stay qlora's LoRA layers (Liger's SwiGLU MLP calls them as modules).
On a CPU, or without the package, nothing changes; an installed Liger or Triton that fails to import (a
Triton built for another CUDA, say) is skipped with a warning, not a traceback (``liger_kernels: true`` refuses).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from qlora_cli.errors import ConfigError


def apply_liger(model: Any, mode: str) -> bool:
    """Patch ``model`` with Liger kernels. ``mode``: "auto" (when usable), "true" (required), "false".

    Returns True when the kernels were applied."""
    if mode == "false":
        return False
    device = next(model.parameters()).device
    reason = broken = None
    patch = None
    if device.type != "cuda":
        reason = "Liger kernels need a CUDA GPU"
    else:
        try:
            module = importlib.import_module("liger_kernel.transformers")
            patch = getattr(module, f"apply_liger_kernel_to_{model.config.model_type}", None)
            if patch is None:
                reason = f"Liger has no kernels for {model.config.model_type}"
        except ModuleNotFoundError as e:
            if e.name is None or not e.name.startswith("liger_kernel"):
                broken = f"{type(e).__name__}: {e}"
            reason = "liger-kernel is not installed (pip install liger-kernel)" if broken is None else None
        except Exception as e:  # noqa: BLE001 - a broken Triton/Liger install raises anything on import
            broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if broken is not None:
            reason = f"liger-kernel is installed but does not import ({broken})"
    if patch is None:
        if mode == "true":
            raise ConfigError(f"liger_kernels: true, but {reason}")
        if broken is not None:  # installed, so the user expects it: say why it is not used
            warnings.warn(f"liger_kernels: {reason}; training without Liger kernels", RuntimeWarning, stacklevel=2)
        return False
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return True
