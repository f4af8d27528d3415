"""Many LoRA adapters on one frozen base, mixed in one batch: each row of a batch picks its adapter (or none).

    y[b] = W x[b] + s[a_b] · (x[b] A[a_b]) B[a_b]        a_b = the adapter slot of row b, -1 = the base alone

Each wrapped layer keeps every loaded adapter stacked, ``A`` (S, in, r_max) and ``B`` (S, r_max, out), with
ranks padded to the layer's largest rank by zeros (a zero column of A and a zero row of B add exactly nothing),
so adapters of different ranks share one batched operation. This is the BGMV idea of Punica and S-LoRA: each
row is multiplied by its own adapter's A and B, reading just those weights, so eight rows for eight adapters
cost about what eight rows for one adapter cost. A decode step does it without copying any weight: ``x·A`` for
row b is a weighted sum of the rows ``slot_b·in ... slot_b·in + in - 1`` of A viewed as (S·in, r), which is
what ``embedding_bag(..., per_sample_weights=x, mode=sum)`` computes, and likewise ``h·B``. A prefill
(many tokens per row) gathers each row's A and B once and uses two ``bmm``. A batch whose rows all use one
adapter is two plain matmuls.

``MultiLoRA(model)`` owns the slots: ``load(name, folder)`` checks a PEFT-format adapter against the base
(module names exist, shapes match) before touching anything, wraps the modules it targets that are not
wrapped yet, and writes its weights into a free slot; ``unload(name)`` retires the slot, which is zeroed and
reused once no request pins it (``pin``/``unpin``). ``use_rows(slots)`` says which slot each row of the next
forward uses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_cli.errors import ModelError
from qlora_cli.kernels.lora_linear import base_forward
from qlora_cli.model.adapter_io import (
    adapter_modules,
    check_fit,
    linear_modules,
    read_adapter,
    refuse_dora,
    refuse_rows,
    settings_from_peft_config,
)
from qlora_cli.model.loading import module_device
from qlora_cli.model.lora import AroundLinear, LoRALinear, linear_shape, matches_target, output_head

BASE_ONLY = -1  # the slot of a row that uses no adapter


class RowAdapters:
    """Which adapter slot each row of the current forward uses; shared by every ``MultiLoRALinear``."""

    def __init__(self) -> None:
        self.set(None, BASE_ONLY)

    def set(self, index: torch.Tensor | None, uniform: int | None) -> None:
        self.index = index  # (B,) long on the model's device; None: base only
        self.uniform = uniform  # the one slot every row uses, or None for a mixed batch
        self.slots = index.clamp(min=0) if index is not None else None  # (B,) base-only rows borrow slot 0 ...
        self.keep: torch.Tensor | None = None  # ... and are multiplied by keep (B, 1): 0 for them, 1 otherwise
        if index is not None and uniform is None and bool((index < 0).any()):
            self.keep = (index >= 0).to(torch.float32)[:, None]
        self._bags: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def bags(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a (S·n, ...) stack: the flat row indices ``slot_b·n + [0, n)`` of every row b, and where each row's
        bag starts (``torch.embedding_bag``'s indices and offsets), cached per forward."""
        if n not in self._bags:
            assert self.slots is not None
            arange = torch.arange(n, device=self.slots.device)
            indices = (self.slots[:, None] * n + arange).reshape(-1)
            offsets = torch.arange(0, len(self.slots) * n, n, device=self.slots.device)
            self._bags[n] = indices, offsets
        return self._bags[n]


def bag_matmul(stack: torch.Tensor, rows: RowAdapters, x: torch.Tensor) -> torch.Tensor:
    """Row b of ``x`` (B, n) times its adapter's (n, m) matrix, for ``stack`` (S·n, m): a weighted sum of the
    matrix's rows, which is what ``embedding_bag`` computes, reading only those rows and copying nothing."""
    indices, offsets = rows.bags(x.shape[1])
    # (weight, indices, offsets, scale_grad_by_freq, mode=sum, sparse, per_sample_weights) -> (B, m)
    return torch.embedding_bag(stack, indices, offsets, False, 0, False, x.reshape(-1))[0]


class MultiLoRALinear(AroundLinear):
    """A frozen linear layer plus every loaded adapter's low-rank update, picked per row of the batch."""

    def __init__(self, base: nn.Module, rows: RowAdapters, capacity: int, device: torch.device):
        super().__init__()
        in_features, out_features, _ = linear_shape(base)
        self.base = base
        self.rows = rows
        self.in_features, self.out_features = in_features, out_features
        # float32 like LoRALinear's weights; B is stored times the adapter's scaling
        self.register_buffer("lora_A", torch.zeros(capacity, in_features, 0, device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(capacity, 0, out_features, device=device), persistent=False)
        self.present = [False] * capacity  # which slots this layer holds (a host list: no device sync to check)

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = base_forward(self.base, x)
        rows = self.rows
        if rows.index is None or rows.uniform == BASE_ONLY or self.rank == 0:
            return out
        x_lora = x.to(torch.float32)
        if rows.uniform is not None:  # every row uses one adapter: two plain matmuls
            if not self.present[rows.uniform]:
                return out
            update = (x_lora @ self.lora_A[rows.uniform]) @ self.lora_B[rows.uniform]  # (..., r) -> (..., out)
            return out + update.to(out.dtype)
        B, S, r = rows.index.shape[0], self.capacity, self.rank
        if x.shape[0] != B:
            raise RuntimeError(f"MultiLoRALinear: input has {x.shape[0]} rows, the row index has {B}")
        x3 = x_lora.reshape(B, -1, self.in_features)  # (B, T, in)
        if x3.shape[1] == 1:  # a decode step: bag sums over the stacks, no weight is copied
            h = bag_matmul(self.lora_A.view(S * self.in_features, r), rows, x3[:, 0])  # (B, r)
            if rows.keep is not None:
                h = h * rows.keep
            update = bag_matmul(self.lora_B.view(S * r, self.out_features), rows, h)  # (B, out)
        else:  # a prefill: gather each row's A and B once for its T tokens, two batched matmuls
            h = torch.bmm(x3, self.lora_A[rows.slots])  # (B, T, in) @ (B, in, r) -> (B, T, r)
            if rows.keep is not None:
                h = h * rows.keep[:, :, None]
            update = torch.bmm(h, self.lora_B[rows.slots])  # (B, T, r) @ (B, r, out) -> (B, T, out)
        return out + update.reshape(*out.shape).to(out.dtype)

    # -- slot storage, called by MultiLoRA under its lock ---------------------------------------
    def grow(self, capacity: int, rank: int) -> None:
        """Make room for ``capacity`` slots of rank ``rank``; existing weights keep their place, padding is zero."""
        cap, r = self.capacity, self.rank
        if capacity <= cap and rank <= r:
            return
        capacity, rank = max(capacity, cap), max(rank, r)
        A = self.lora_A.new_zeros(capacity, self.in_features, rank)
        B = self.lora_B.new_zeros(capacity, rank, self.out_features)
        A[:cap, :, :r], B[:cap, :r, :] = self.lora_A, self.lora_B
        self.lora_A, self.lora_B = A, B
        self.present += [False] * (capacity - cap)

    def shrink(self, rank: int) -> None:
        """Drop rank padding above ``rank`` (after the largest adapter left): every forward pays for it."""
        if rank < self.rank:
            self.lora_A = self.lora_A[:, :, :rank].contiguous()
            self.lora_B = self.lora_B[:, :rank, :].contiguous()

    def set_slot(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
        """Write one adapter: ``lora_A`` (r, in) and ``lora_B`` (out, r) as PEFT stores them."""
        r = lora_A.shape[0]
        self.grow(slot + 1, r)
        self.clear_slot(slot)
        self.lora_A[slot, :, :r] = lora_A.T.to(self.lora_A)
        self.lora_B[slot, :r, :] = (lora_B.T.to(torch.float32) * scaling).to(self.lora_B)
        self.present[slot] = True

    def clear_slot(self, slot: int) -> None:
        if slot < self.capacity:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.present[slot] = False

    def extra_repr(self) -> str:
        return f"slots={self.capacity}, r_max={self.rank}"


@dataclass
class Adapter:
    """One loaded adapter: its slot in every layer's stack and what it was read from."""

    name: str
    path: Path
    slot: int
    r: int
    scaling: float
    modules: list[str]
    config: dict[str, Any] = field(repr=False, default_factory=dict)


class MultiLoRA:
    """The adapters loaded into one base model, and the row -> adapter choice for the next forward."""

    def __init__(self, model: nn.Module):
        if any(isinstance(m, LoRALinear | MultiLoRALinear) for m in model.modules()):
            raise ModelError("this model already has LoRA layers; serve adapters from a plain base model")
        self.model = model
        self.rows = RowAdapters()
        head = output_head(model)
        # every linear layer an adapter may target (the head too: PEFT allows it), before any wrapping
        self.linear: dict[str, nn.Module] = linear_modules(model)
        self.default_targets = [n for n, m in self.linear.items() if m is not head]  # what all-linear means
        self.layers: dict[str, MultiLoRALinear] = {}
        self.adapters: dict[str, Adapter] = {}
        self.capacity = 0
        self.free: list[int] = []
        self.retired: dict[int, str] = {}  # slot -> name: unloaded, but requests still pin it
        self.pins: dict[int, int] = {}  # slot -> how many requests use it (see pin/unpin)
        self.slot_rank: dict[int, int] = {}  # slot -> its adapter's rank, while the slot holds one
        self.lock = threading.RLock()  # held by each forward and each load/unload
        self.device = module_device(model)

    # -- loading ----------------------------------------------------------------------------------
    def load(self, name: str, folder: str | Path) -> Adapter:
        """Read, check and add an adapter under ``name``. Raises ``ModelError`` (one line) and changes nothing
        when the adapter does not fit the base."""
        config, state = read_adapter(folder)
        refuse_dora(config, f"adapter {folder}", "qlora serve")
        refuse_rows(config, state, f"adapter {folder}", "qlora serve")
        settings = settings_from_peft_config(config)
        weights = self._check_fit(folder, config, state, settings.r)
        with self.lock:
            if name in self.adapters:
                raise ModelError(f"an adapter named {name!r} is already loaded")
            slot = self._take_slot()
            for module_name in weights:
                if module_name not in self.layers:
                    self._wrap(module_name)
            for module_name, layer in self.layers.items():
                if module_name in weights:
                    lora_A, lora_B = weights[module_name]
                    layer.set_slot(slot, lora_A, lora_B, settings.scaling)
                else:
                    layer.grow(slot + 1, 0)
                    layer.clear_slot(slot)
            adapter = Adapter(name, Path(folder), slot, settings.r, settings.scaling, sorted(weights), config)
            self.slot_rank[slot] = settings.r
            self.adapters[name] = adapter
        return adapter

    def _check_fit(
        self, folder: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor], r: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A (r, in), B (out, r)) in float32} after ``adapter_io.check_fit`` against the base's linear
        layers (as they were before any adapter was loaded)."""
        where = f"adapter {folder}"
        modules = adapter_modules(state, where)
        check_fit(modules, r, self.linear, lambda: self._targeted(config["target_modules"]), where)
        return {m: (a.to(torch.float32), b.to(torch.float32)) for m, (a, b) in modules.items()}

    def _targeted(self, targets: list[str] | str) -> list[str]:
        """The base's linear layers an adapter's target_modules select (the head too when named)."""
        if targets == "all-linear":
            return list(self.default_targets)
        targets = [targets] if isinstance(targets, str) else list(targets)
        return [n for n in self.linear if any(matches_target(n, t) for t in targets)]

    def _take_slot(self) -> int:
        if self.free:
            return self.free.pop(0)
        self.capacity += 1
        return self.capacity - 1

    def _wrap(self, name: str) -> None:
        base = self.linear[name]
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = MultiLoRALinear(base, self.rows, self.capacity, self.device)
        layer.train(base.training)
        setattr(parent, child, layer)
        self.layers[name] = layer

    # -- unloading ----------------------------------------------------------------------------------
    def unload(self, name: str) -> None:
        """Stop offering ``name``; its slot is zeroed and reused once no request pins it any more."""
        with self.lock:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                raise ModelError(f"no adapter named {name!r} is loaded")
            self.retired[adapter.slot] = name
            self._free_if_unused(adapter.slot)

    def pin(self, name: str) -> int:
        """The slot of ``name``, kept for this request until ``unpin``: unloading cannot hand it to another
        adapter while the request still runs on it."""
        with self.lock:
            slot = self.slot(name)
            self.pins[slot] = self.pins.get(slot, 0) + 1
            return slot

    def unpin(self, slot: int) -> None:
        with self.lock:
            left = self.pins.get(slot, 0) - 1
            if left > 0:
                self.pins[slot] = left
                return
            self.pins.pop(slot, None)
            self._free_if_unused(slot)

    def _free_if_unused(self, slot: int) -> None:
        if slot in self.retired and slot not in self.pins:
            for layer in self.layers.values():
                layer.clear_slot(slot)
            del self.retired[slot]
            self.free.append(slot)
            self.slot_rank.pop(slot, None)
            rank = max(self.slot_rank.values(), default=0)
            for layer in self.layers.values():
                layer.shrink(rank)

    # -- per-row choice -----------------------------------------------------------------------------
    def slot(self, name: str | None) -> int:
        """The slot of a loaded adapter; ``None`` means the base alone."""
        if name is None:
            return BASE_ONLY
        adapter = self.adapters.get(name)
        if adapter is None:
            raise ModelError(f"no adapter named {name!r} is loaded")
        return adapter.slot

    @contextmanager
    def use_rows(self, slots: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Inside this block, row ``b`` of a forward uses adapter slot ``slots[b]`` (-1: the base alone)."""
        used = set(slots.tolist() if isinstance(slots, torch.Tensor) else slots)
        index = torch.as_tensor(slots, dtype=torch.long).to(self.device)
        with self.lock:
            self.rows.set(index, next(iter(used)) if len(used) == 1 else None)
            try:
                yield
            finally:
                self.rows.set(None, BASE_ONLY)
