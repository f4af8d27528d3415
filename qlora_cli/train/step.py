"""One optimizer step's forward and backward, the part the memory plan traces too.

accumulate_gradients   one step's micro-batches on this process, each token weighted alike
  micro_batch_step     collate -> autocast -> ``loss.loss_sum`` -> backward, for one micro-batch
Precision              autocast to the compute dtype; fp16 loss scaling
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from qlora_cli.data.pipeline import Example, collate, collate_packed
from qlora_cli.errors import ConfigError
from qlora_cli.model.loading import DTYPES, autocast
from qlora_cli.train.loss import loss_sum


@dataclass
class Precision:
    """Autocast to the compute dtype (norms and the loss stay float32); fp16 also needs loss scaling."""

    device_type: str
    dtype: torch.dtype
    scaler: Any = None

    @classmethod
    def for_run(cls, compute_dtype: str, device: torch.device) -> Precision:
        if compute_dtype == "float16" and device.type == "cpu":
            raise ConfigError("bnb_4bit_compute_dtype: float16 needs a GPU; use bfloat16 or float32 on CPU")
        dtype = DTYPES[compute_dtype]
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return cls(device.type, dtype, scaler)

    def autocast(self) -> Any:
        return autocast(self.dtype, self.device_type)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()


def micro_batch_step(
    model: Any,
    rows: list[list[Example]],
    *,
    device: torch.device,
    precision: Precision,
    pad_id: int,
    pad_multiple: int = 1,
    packed: bool = False,
    fused_cross_entropy: bool = False,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch: collate, autocast, ``loss_sum``, backward of the summed token
    loss times ``loss_scale``. A row is one example, or several when ``packed``. Returns (the summed token loss,
    detached; the (B, T) mask of real tokens, on the CPU). The memory plan traces this same function."""
    if packed:
        batch = collate_packed(rows, pad_id, pad_multiple)
    else:
        batch = collate([row[0] for row in rows], pad_id, pad_multiple)
    tokens = batch.pop("token_mask", batch.get("attention_mask"))
    batch = {k: v.to(device) for k, v in batch.items()}
    with precision.autocast():
        s, _ = loss_sum(model, batch, fused_cross_entropy)
    precision.backward(s * loss_scale)
    return s.detach(), tokens


def accumulate_gradients(
    model: Any,
    micro_batches: list[list[list[Example]]],
    *,
    device: torch.device,
    precision: Precision,
    pad_id: int,
    pad_multiple: int = 1,
    packed: bool = False,
    fused_cross_entropy: bool = False,
    n_targets: int | None = None,
    world_size: int = 1,
    seeds: list[int] | None = None,
    no_sync: Any = nullcontext,
) -> tuple[float, int, int]:
    """Forward and backward over one optimizer step's micro-batches (on this process).

    The loss is the sum of token losses divided by ``n_targets``, the target tokens of the whole step on every
    process, so each target token weighs the same however the step is cut into micro-batches and processes
    (DDP averages gradients over processes, hence the factor ``world_size``).
    ``seeds`` (one per micro-batch) reseed the RNG before each forward, so dropout masks depend on which
    micro-batch it is, not on which process runs it or whether the run was resumed.
    Returns (summed loss, target tokens, real tokens) of this process's micro-batches.
    """
    local_targets = sum(e.n_targets for mb in micro_batches for row in mb for e in row)
    n_targets = local_targets if n_targets is None else n_targets
    total, n_tokens = 0.0, 0
    for j, rows in enumerate(micro_batches):
        if seeds is not None:
            torch.manual_seed(seeds[j])
        last = j == len(micro_batches) - 1
        with nullcontext() if last else no_sync(model):  # DDP: all-reduce gradients once, on the last
            s, tokens = micro_batch_step(
                model,
                rows,
                device=device,
                precision=precision,
                pad_id=pad_id,
                pad_multiple=pad_multiple,
                packed=packed,
                fused_cross_entropy=fused_cross_entropy,
                loss_scale=world_size / max(n_targets, 1),
            )
        total += float(s)
        n_tokens += int(tokens.sum())
    return total, local_targets, n_tokens


def idle_backward(model: Any, row: list[Example], pad_id: int, device: torch.device, precision: Precision) -> None:
    """A process with no data in this step still joins DDP's gradient all-reduce, contributing zeros."""
    batch = {k: v.to(device) for k, v in collate(row[:1], pad_id).items()}
    with precision.autocast():
        s, _ = loss_sum(model, batch)
    precision.backward(s * 0.0)


def clip_gradients(params: list[torch.nn.Parameter] | Any, max_norm: float | None) -> float:
    """Clip and return the total gradient norm; an FSDP module computes it across its shards."""
    limit = max_norm if max_norm is not None else float("inf")
    if hasattr(params, "clip_grad_norm_"):
        return float(params.clip_grad_norm_(limit))
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: over every shard
