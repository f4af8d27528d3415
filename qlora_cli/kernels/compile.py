"""``torch_compile: true``: each decoder layer compiled with ``torch.compile``, qlora's LoRA layers inside it.

The norms, rotary embedding, attention, SwiGLU product and residual adds between the matmuls are fused by the
compiler; the LoRA layers (one autograd node each, with their own 4-bit dequantization) and any bare 4-bit layer
run as they are, between the compiled pieces (graph breaks), so the compiled code never traces bitsandbytes'
weights. Off by default; measured in docs/benchmarks.md. Gradient checkpointing needs the whole layer as one graph
and is refused with it (config). Where the compiler's toolchain is missing (a C++ compiler on a CPU, Triton on a
GPU) the run goes on uncompiled after one warning line.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

import torch


def compile_missing(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here, or None."""
    if not hasattr(torch, "compile"):  # pragma: no cover - every supported torch has it
        return "this torch has no torch.compile"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed (pip install triton)"
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "no C++ compiler found (g++, c++ or clang++; or set CXX)"
    return None


def compile_layers(model: Any, device: torch.device, warn: Any, outside: Any = lambda module: False) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many (0: not compiled, ``warn`` said why).
    Modules for which ``outside(module)`` holds (qlora's LoRA layers) and bare 4-bit layers run uncompiled."""
    from qlora_cli.kernels.lora_linear import quant_state_of

    missing = compile_missing(device)
    if missing:
        warn(f"torch_compile: {missing}; training uncompiled")
        return 0
    for module in model.modules():  # run as they are, outside the compiled graphs
        if outside(module) or (isinstance(module, torch.nn.Linear) and quant_state_of(module)):
            module.forward = torch.compiler.disable(module.forward, recursive=True)
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    for layer in layers:
        layer.compile()
    return len(layers)
