"""Many LoRA adapters on one frozen base, mixed in one batch: each row of a batch picks its adapter (or none).

    y[b] = W x[b] + s[a_b] · (x[b] A[a_b]) B[a_b]        a_b = the adapter slot of row b, -1 = the base alone

Each wrapped layer keeps every loaded adapter stacked, ``A`` (S, in, r_max) and ``B`` (S, r_max, out), with
ranks padded to the layer's largest rank by zeros (a zero column of A and a zero row of B add exactly nothing),
so adapters of different ranks share one batched matmul. A forward gathers the rows' A and B and applies them
with two ``bmm`` calls: the BGMV idea of Punica and S-LoRA, so eight rows for eight adapters cost about what
eight rows for one adapter cost. A batch whose rows all use one adapter skips the gather.

``MultiLoRA(model)`` owns the slots: ``load(name, folder)`` checks a PEFT-format adapter against the base
(module names exist, shapes match) before touching anything, wraps the modules it targets that are not
wrapped yet, and writes its weights into a free slot; ``unload(name)`` retires the slot, which is zeroed and
reused once no running row still uses it (``release``). ``use_rows(slots)`` says which slot each row of the
next forward uses.
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

from qlora_cli.adapter_io import read_adapter, settings_from_peft_config
from qlora_cli.errors import ModelError
from qlora_cli.lora import LoRALinear, linear_module_names, linear_shape, matches_target, output_head

BASE_ONLY = -1  # the slot of a row that uses no adapter


class RowAdapters:
    """Which adapter slot each row of the current forward uses; shared by every ``MultiLoRALinear``."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # (B,) long on the model's device; None: base only
        self.uniform: int | None = BASE_ONLY  # the one slot every row uses, or None for a mixed batch


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus every loaded adapter's low-rank update, picked per row of the batch."""

    def __init__(self, base: nn.Module, rows: RowAdapters, capacity: int, device: torch.device):
        super().__init__()
        in_features, out_features, _ = linear_shape(base)
        self.base = base
        self.rows = rows
        self.in_features, self.out_features = in_features, out_features
        # float32 like LoRALinear's weights, so a mixed batch computes what each adapter alone computes
        self.register_buffer("lora_A", torch.zeros(capacity, in_features, 0, device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(capacity, 0, out_features, device=device), persistent=False)
        self.register_buffer("scaling", torch.zeros(capacity, device=device), persistent=False)  # 0: not here
        self.slot_scaling = [0.0] * capacity  # the same on the host: no device sync to skip an absent adapter

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        index, uniform = self.rows.index, self.rows.uniform
        if index is None or uniform == BASE_ONLY or self.rank == 0:
            return out
        x_lora = x.to(torch.float32)
        if uniform is not None:  # every row uses one adapter: plain matmuls, no gather
            scaling = self.slot_scaling[uniform]
            if not scaling:
                return out
            update = (x_lora @ self.lora_A[uniform]) @ self.lora_B[uniform]  # (..., r) -> (..., out)
            return out + (update * scaling).to(out.dtype)
        rows = index.shape[0]
        if x.shape[0] != rows:
            raise RuntimeError(f"MultiLoRALinear: input has {x.shape[0]} rows, the row index has {rows}")
        slots = index.clamp(min=0)
        scale = self.scaling[slots] * (index >= 0)  # (B,)  base-only rows add nothing
        x3 = x_lora.reshape(rows, -1, self.in_features)  # (B, T, in)
        h = torch.bmm(x3, self.lora_A[slots])  # (B, T, in) @ (B, in, r) -> (B, T, r)
        update = torch.bmm(h, self.lora_B[slots]) * scale[:, None, None]  # (B, T, r) @ (B, r, out) -> (B, T, out)
        return out + update.reshape(*out.shape).to(out.dtype)

    # -- slot storage, called by MultiLoRA under its lock ---------------------------------------
    def grow(self, capacity: int, rank: int) -> None:
        """Make room for ``capacity`` slots of rank ``rank``; existing weights keep their place, padding is zero."""
        cap, r = self.lora_A.shape[0], self.rank
        if capacity <= cap and rank <= r:
            return
        capacity, rank = max(capacity, cap), max(rank, r)
        A = self.lora_A.new_zeros(capacity, self.in_features, rank)
        B = self.lora_B.new_zeros(capacity, rank, self.out_features)
        s = self.scaling.new_zeros(capacity)
        A[:cap, :, :r], B[:cap, :r, :], s[:cap] = self.lora_A, self.lora_B, self.scaling
        self.lora_A, self.lora_B, self.scaling = A, B, s
        self.slot_scaling += [0.0] * (capacity - cap)

    def set_slot(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
        """Write one adapter: ``lora_A`` (r, in) and ``lora_B`` (out, r) as PEFT stores them."""
        r = lora_A.shape[0]
        self.grow(slot + 1, r)
        self.clear_slot(slot)
        self.lora_A[slot, :, :r] = lora_A.T.to(self.lora_A)
        self.lora_B[slot, :r, :] = lora_B.T.to(self.lora_B)
        self.scaling[slot] = scaling
        self.slot_scaling[slot] = scaling

    def clear_slot(self, slot: int) -> None:
        if slot < self.lora_A.shape[0]:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.scaling[slot] = 0.0
            self.slot_scaling[slot] = 0.0

    def extra_repr(self) -> str:
        return f"slots={self.lora_A.shape[0]}, r_max={self.rank}"


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
        self.linear: dict[str, nn.Module] = {n: model.get_submodule(n) for n in linear_module_names(model, True)}
        self.default_targets = [n for n, m in self.linear.items() if m is not head]  # what all-linear means
        self.layers: dict[str, MultiLoRALinear] = {}
        self.adapters: dict[str, Adapter] = {}
        self.capacity = 0
        self.free: list[int] = []
        self.retired: dict[int, str] = {}  # slot -> name, unloaded but maybe still used by running rows
        self.lock = threading.RLock()  # held by each forward and each load/unload
        self.device = _device_of(model)

    # -- loading ----------------------------------------------------------------------------------
    def load(self, name: str, folder: str | Path) -> Adapter:
        """Read, check and add an adapter under ``name``. Raises ``ModelError`` (one line) and changes nothing
        when the adapter does not fit the base."""
        if name in self.adapters:
            raise ModelError(f"an adapter named {name!r} is already loaded")
        config, state = read_adapter(folder)
        settings = settings_from_peft_config(config)
        weights = self._check_fit(folder, config, state, settings.r)
        with self.lock:
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
            self.adapters[name] = adapter
        return adapter

    def _check_fit(
        self, folder: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor], r: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A (r, in), B (out, r))} after checking every saved module against the base."""
        where = f"adapter {folder} does not fit the base model"
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            module, sep, rest = key.rpartition(".lora_")
            if not sep or rest not in ("A.weight", "B.weight"):
                raise ModelError(f"{where}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
            saved.setdefault(module, {})[rest[0]] = tensor
        if not saved:
            raise ModelError(f"adapter {folder} holds no LoRA weights")
        targets = config["target_modules"]
        if targets == "all-linear":
            targeted = list(self.default_targets)
        else:
            targets = [targets] if isinstance(targets, str) else list(targets)
            targeted = [n for n in self.linear if any(matches_target(n, t) for t in targets)]
        for module, pair in saved.items():
            if module not in self.linear:
                raise ModelError(f"{where}: no linear module named {module!r}")
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "A" in pair else "lora_A"
                raise ModelError(f"adapter {folder} has no {missing} weight for {module!r}")
            n_in, n_out, _ = linear_shape(self.linear[module])
            for which, want in (("A", (r, n_in)), ("B", (n_out, r))):
                got = tuple(pair[which].shape)
                if got != want:
                    raise ModelError(f"{where}: {module}.lora_{which} has shape {got}, the base needs {want}")
        not_saved = [n for n in targeted if n not in saved]
        if not_saved:
            raise ModelError(f"adapter {folder} has no weights for targeted module {not_saved[0]!r}")
        return {m: (p["A"].to(torch.float32), p["B"].to(torch.float32)) for m, p in saved.items()}

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
        """Stop offering ``name``; its slot is freed once no running row uses it (see ``release``)."""
        with self.lock:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                raise ModelError(f"no adapter named {name!r} is loaded")
            self.retired[adapter.slot] = name

    def release(self, busy: Sequence[int] = ()) -> None:
        """Zero and free the retired slots that no row in ``busy`` still uses."""
        with self.lock:
            for slot in [s for s in self.retired if s not in set(busy)]:
                for layer in self.layers.values():
                    layer.clear_slot(slot)
                del self.retired[slot]
                self.free.append(slot)

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
        index = torch.as_tensor(slots, dtype=torch.long).to(self.device)
        values = set(index.tolist())
        with self.lock:
            self.rows.index, self.rows.uniform = index, (values.pop() if len(values) == 1 else None)
            try:
                yield
            finally:
                self.rows.index, self.rows.uniform = None, BASE_ONLY


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
