"""Measuring what a training run holds, to check the memory plan against (tests and ``scripts/bench_memory_plan.py``);
nothing in a command uses it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qlora_cli.config import RunConfig
from qlora_cli.memory_plan.sizes import resident_bytes


def measured_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (shared tensors once)."""
    storages: dict[int, int] = {}
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    return sum(storages.values())


def measure_training_peak(cfg: RunConfig) -> dict[str, int]:
    """Run ``train.loop.run_train(cfg)`` (on CPU) and measure its peak tensor memory, to compare with ``plan_memory``.

    What "measured" means on CPU: the bytes of every tensor the model holds (parameters incl. the adapter,
    buffers, quant state: ``resident_bytes``), plus the peak, from the model's first forward to the end of the
    run, of the bytes torch's CPU allocator has handed out beyond what it had at that moment
    (``torch.profiler`` memory events, recorded from that moment: every allocation and free through c10's
    allocator, kernel temporaries included). Loading is excluded: on a GPU it is host memory, and profiling it
    is slow. Returns resident, step_peak and tensor_peak in bytes.
    """
    from rich.console import Console
    from torch.profiler import ProfilerActivity, profile

    from qlora_cli.train.loop import run_train

    model: list[nn.Module] = []
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def first_forward(module: nn.Module, args: Any) -> None:
        if not model:  # pre-hooks run outermost first: this is the whole model
            model.append(module)
            prof.start()  # only what is allocated from here on is reported, frees of older blocks are not

    handle = nn.modules.module.register_module_forward_pre_hook(first_forward)
    try:
        run_train(cfg, force=True, console=Console(quiet=True))
    finally:
        handle.remove()
        if model:
            prof.stop()
    # counted after the run: during a forward the fused loss has the head taken off the model
    resident = resident_bytes(model[0])
    memory = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = step = 0
    for _, n in memory:
        running += n
        step = max(step, running)
    return {"resident": resident, "step_peak": step, "tensor_peak": resident + step}
