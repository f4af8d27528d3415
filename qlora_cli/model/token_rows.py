"""New tokens and trained embedding rows: PEFT's trainable tokens (``trainable_token_indices``).

A run that adds tokens (``tokens``, ``special_tokens``) or names token ids (``trainable_token_indices``) trains
those rows of the input embedding, and of the output head unless the head shares the embedding's weight, while
every other row stays frozen. Each wrapped module computes with its weight's rows replaced by the trained ones
(``W.index_copy(0, ids, rows)``), as PEFT's ``TrainableTokensLayer`` does: replaced, not added, so the rows the
base was resized with never matter. Saved under PEFT's keys (``<module>.token_adapter.trainable_tokens_delta``,
(n, dim)) with ``trainable_token_indices: {module name: ids}`` in adapter_config.json, so PEFT loads it on a base
resized to the run's tokenizer.

The rows start at the mean of the base's rows that existed before (the usual start for new tokens), or at their
own values for tokens the base already had.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qlora_cli.errors import ModelError

ROWS_KEY = ".token_adapter.trainable_tokens_delta"  # PEFT's key suffix in adapter files


class TrainedRows(nn.Module):
    """An embedding (or output head) whose rows ``indices`` are trained float32 values; the rest is the base's."""

    def __init__(self, base: nn.Module, indices: list[int], rows: nn.Parameter):
        super().__init__()
        self.base = base
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=base.weight.device), False)
        self.rows = rows  # (n, dim); the same Parameter on a head tied to the embedding
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def merged_weight(self) -> torch.Tensor:
        weight = self.base.weight
        return weight.index_copy(0, self.indices, self.rows.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        weight = self.merged_weight()
        if isinstance(self.base, nn.Embedding):
            out = F.embedding(x, weight, self.base.padding_idx, self.base.max_norm, self.base.norm_type,
                              self.base.scale_grad_by_freq, self.base.sparse)  # fmt: skip
            scale = getattr(self.base, "embed_scale", None)  # Gemma 3's scaled embedding scales in its forward
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
        return F.linear(x, weight.to(x.dtype), getattr(self.base, "bias", None))

    def extra_repr(self) -> str:
        return f"rows={len(self.indices)}"


class TrainedCopy(TrainedRows):
    """The whole embedding (or head) as a trained float32 copy: PEFT's ``modules_to_save``. Its rows are every row
    (``indices`` all ids), so everything that reads trained rows (the optimizer, merge, resume) takes it too."""

    def merged_weight(self) -> torch.Tensor:
        return self.rows.to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"full copy, rows={len(self.indices)}"


COPY_KEY = ".weight"  # a full copy's key suffix in adapter files (PEFT's: the module's own weight name)


def is_copy_key(key: str) -> bool:
    """A tensor of an adapter file that is a whole module's weight (``modules_to_save``), not a LoRA tensor."""
    return key.endswith(COPY_KEY) and ".lora_" not in key and not key.endswith((ROWS_KEY, ".lora_magnitude_vector"))


@torch.no_grad()
def train_copies(model: Any, names: list[str]) -> list[str]:
    """Wrap the embedding and/or output head ``names`` (their module names' last part) as trained full copies
    (PEFT's ``modules_to_save``); a head tied to the embedding shares one copy with it (PEFT's
    ``ensure_weight_tying``). Returns the module names (last parts) saved, tied partners included."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    paths = {id(m): n for n, m in model.named_modules()}
    embed_name = paths[id(embed)].rsplit(".", 1)[-1]
    head_name = paths[id(head)].rsplit(".", 1)[-1] if head is not None else None
    for name in names:
        if name not in (embed_name, head_name):
            raise ModelError(
                f"modules_to_save: {name!r} is not this model's input embedding ({embed_name!r}) or output head "
                f"({head_name!r}); qlora trains full copies of those two only (LoRA trains the rest)"
            )
    if head is not None and head_name in names and hasattr(head, "lora_A"):
        raise ModelError(f"modules_to_save: {head_name!r} is also a LoRA target; leave it out of lora_target_modules")
    if head is not None and head_name in names and hasattr(head.weight, "quant_state"):
        raise ModelError("modules_to_save: the output head is quantized; a full copy needs a 16-bit head")
    tied = heads_tied(model)
    saved: list[str] = []
    if embed_name in names or (tied and head_name in names):
        rows = nn.Parameter(embed.weight.detach().float().clone())
        ids = list(range(embed.num_embeddings))
        _set(model, embed, TrainedCopy(embed, ids, rows))
        saved.append(embed_name)
        if tied and head is not None:
            _set(model, head, TrainedCopy(head, ids, rows))
            saved.append(head_name)
    if head is not None and head_name in names and not tied:
        rows = nn.Parameter(head.weight.detach().float().clone())
        _set(model, head, TrainedCopy(head, list(range(head.weight.shape[0])), rows))
        saved.append(head_name)
    return saved


def row_modules(model: nn.Module) -> Iterator[tuple[str, TrainedRows]]:
    """(name, layer) of every wrapped module; a head tied to the embedding shares its rows."""
    for name, module in model.named_modules():
        if isinstance(module, TrainedRows):
            yield name, module


def row_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trained rows, each Parameter once (a tied head shares the embedding's)."""
    seen: dict[int, nn.Parameter] = {}
    for _, m in row_modules(model):
        seen.setdefault(id(m.rows), m.rows)
    return list(seen.values())


def _set(model: nn.Module, module: nn.Module, new: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            return name
    raise ModelError("the model's embedding is not one of its modules")


def heads_tied(model: Any) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embed.weight


def resize_for(model: Any, size: int) -> None:
    """Grow the embedding (and an untied head) to ``size`` rows; never shrink (a padded vocabulary stays)."""
    before = model.get_input_embeddings().num_embeddings
    if size <= before:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():  # the new rows: the mean of the old ones, the same every time (trained rows replace them)
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and module.weight.shape[0] == size:
                module.weight[before:] = module.weight[:before].float().mean(0).to(module.weight.dtype)


@torch.no_grad()
def train_rows(
    model: Any,
    indices: list[int],
    fresh: set[int] | frozenset[int] = frozenset(),
    rows_before: int | None = None,
    untied_head: bool = True,
) -> dict[str, list[int]]:
    """Wrap the embedding (and an untied output head) so that rows ``indices`` train. The ``fresh`` rows (tokens
    the tokenizer did not have) start at the mean of the base's other rows (the first ``rows_before``: the
    embedding before it was resized); the others at their own values. Returns PEFT's
    ``trainable_token_indices`` ({module name suffix: ids}). ``untied_head`` False: an untied head keeps all
    its base rows (a PEFT adapter that names the embedding only)."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = heads_tied(model)
    size = embed.num_embeddings
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ModelError(f"trainable_token_indices: {bad[0]} is not a token id of this model (0 to {size - 1})")
    rows_before = size if rows_before is None else rows_before
    spec: dict[str, list[int]] = {}

    def start(weight: torch.Tensor) -> nn.Parameter:
        values = weight[indices].float().clone()
        if fresh:
            keep = torch.ones(rows_before, dtype=torch.bool, device=weight.device)
            keep[[i for i in fresh if i < rows_before]] = False
            mean = weight[:rows_before][keep].float().mean(0)
            for row, i in enumerate(indices):
                if i in fresh:
                    values[row] = mean
        return nn.Parameter(values)

    rows = start(embed.weight)
    spec[_set(model, embed, TrainedRows(embed, indices, rows)).rsplit(".", 1)[-1]] = list(indices)
    if head is not None and not isinstance(head, TrainedRows):
        if hasattr(head, "lora_A"):
            raise ModelError(
                "the output head is a LoRA target (lora_target_modules); with tokens to train, its rows train "
                "instead: leave it out of lora_target_modules"
            )
        if tied:  # one weight, one set of rows: the head computes with the same replaced rows
            _set(model, head, TrainedRows(head, indices, rows))
        elif not untied_head:
            pass
        elif isinstance(head, nn.Linear) and not hasattr(head.weight, "quant_state"):
            spec[_set(model, head, TrainedRows(head, indices, start(head.weight))).rsplit(".", 1)[-1]] = list(indices)
        else:
            raise ModelError("the output head is quantized; new tokens need a 16-bit head (transformers keeps it)")
    return spec


def rows_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.token_adapter.trainable_tokens_delta": rows}`` of every wrapped module a file holds (a head
    tied to the embedding is not written: PEFT ties it on load)."""
    state, seen = {}, set()
    for name, m in row_modules(model):
        if isinstance(m, TrainedCopy):  # each module's key, also where tied (PEFT writes both)
            state[name + COPY_KEY] = m.rows.detach()
            continue
        if id(m.rows) in seen:
            continue
        seen.add(id(m.rows))
        state[name + ROWS_KEY] = m.rows.detach()
    return state


@torch.no_grad()
def load_rows(model: Any, spec: dict[str, list[int]], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Wrap the modules ``spec`` names and copy the saved rows in (after ``resize_for``); ``ModelError`` for
    rows that do not fit."""
    rows = {k[: -len(ROWS_KEY)]: v for k, v in tensors.items() if k.endswith(ROWS_KEY)}
    embed_ids = next(iter(spec.values()))
    if any(ids != embed_ids for ids in spec.values()):
        raise ModelError(f"{where}: trainable_token_indices differ between modules; qlora trains the same rows in each")
    train_rows(model, embed_ids, untied_head=len(spec) > 1)
    wrapped = dict(row_modules(model))
    for name, values in rows.items():
        layer = wrapped.get(name)
        if layer is None:
            raise ModelError(f"{where}: trained rows for {name!r}, which is not this model's embedding or head")
        if tuple(values.shape) != tuple(layer.rows.shape):
            raise ModelError(
                f"{where}: {name}{ROWS_KEY} has shape {tuple(values.shape)}, not {tuple(layer.rows.shape)}"
            )
        layer.rows.copy_(values.float())
    missing = [n for n, m in wrapped.items() if not any(m.rows is wrapped[k].rows for k in rows if k in wrapped)]
    if missing:
        raise ModelError(f"{where} has no trained rows for {missing[0]!r}")


@torch.no_grad()
def copy_rows(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Saved rows and full copies into the modules ``train_rows`` / ``train_copies`` wrapped (a checkpoint of
    this run, or an adapter loaded on its model): exactly these, no others."""
    mine = rows_state_dict(model)
    theirs = {k: v for k, v in tensors.items() if k.endswith(ROWS_KEY) or is_copy_key(k)}
    if set(theirs) != set(mine):
        raise ModelError(
            f"{where}: its trained token rows and module copies ({sorted(theirs)}) are not this run's ({sorted(mine)})"
        )
    for key, values in theirs.items():
        if tuple(values.shape) != tuple(mine[key].shape):
            raise ModelError(f"{where}: {key} has shape {tuple(values.shape)}, not {tuple(mine[key].shape)}")
        mine[key].copy_(values.float())  # rows_state_dict's tensors share the trained Parameters' storage


def token_ids(tokenizer: Any, tokens: list[str]) -> list[int]:
    """The ids of ``tokens`` (each one token of ``tokenizer``: added tokens are)."""
    ids = []
    for token in tokens:
        encoded = tokenizer.convert_tokens_to_ids(token)
        if encoded is None or encoded == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise ModelError(f"token {token!r} is not one token of the tokenizer")
        ids.append(int(encoded))
    return ids
