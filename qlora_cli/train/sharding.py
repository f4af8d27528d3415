"""Several processes: FSDP2 helpers and what passes between the processes of a job.

Only the main process (rank 0) of a job reads and writes the run folder: checkpoints are gathered to it and read
back by it alone, then broadcast (``from_main``), so the nodes of a multi-node job need no shared disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from qlora_cli.errors import QLoRAError

T = TypeVar("T")


def fsdp2() -> tuple[Any, Any]:
    """(fully_shard, FSDPModule): public in torch 2.6+, under ``_composable`` in 2.4 and 2.5."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return fully_shard, FSDPModule


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (FSDP2), or the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


@contextmanager
def full_adapter(trained: Any, fsdp: bool) -> Iterator[None]:
    """Every FSDP2 unit gathered whole for the duration (saving reads plain tensors), then sharded again. Every
    process enters it (gathering is collective)."""
    if not fsdp:
        yield
        return
    _, fsdp_module = fsdp2()
    units = [m for m in trained.modules() if isinstance(m, fsdp_module)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with every sharded tensor gathered whole (collective: every process calls it,
    each gets the whole state)."""
    sd = optimizer.state_dict()
    state = {
        idx: {k: v.full_tensor() if is_sharded(v) else v for k, v in sd["state"][idx].items()}
        for idx in sorted(sd["state"])
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(full: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``full_optimizer_state``'s result cut back into this process's shards, for ``optimizer.load_state_dict``
    (collective: every process calls it with the same state)."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, values in full["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: distribute_tensor(v.to(local(p).device), p.device_mesh, p.placements)
            if is_sharded(p) and isinstance(v, torch.Tensor) and v.shape == p.shape
            else v
            for k, v in values.items()
        }
    return {"state": state, "param_groups": full["param_groups"]}


def gather_to_main(accelerator: Any, obj: T) -> list[T] | None:
    """Every process's ``obj`` in rank order on the main process (None elsewhere); every process calls it."""
    if accelerator is None or accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    found: list[Any] | None = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(obj, found, dst=0)
    return found


def from_main(accelerator: Any, read: Callable[[], T]) -> T:
    """``read()`` on the main process and its result on every process; an error it raises is raised on every
    process (so none waits on the others). Only the main process needs the run folder on its disk."""
    if accelerator is None or accelerator.num_processes == 1:
        return read()
    import torch.distributed as dist

    box: list[Any] = [None]
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", read())
        except QLoRAError as e:
            box[0], failure = ("error", type(e), str(e)), e
        except BaseException as e:  # a bug: the others stop too, the main process shows the traceback
            box[0], failure = ("bug", RuntimeError, f"the main process failed: {type(e).__name__}: {e}"), e
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0][0] != "ok":
        raise box[0][1](box[0][2])
    return box[0][1]
