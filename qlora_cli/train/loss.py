"""The causal-LM loss, summed over target tokens, and token-weighted evaluation.

Summing (not averaging) per micro-batch lets the training loop divide by the number of target tokens in
the whole accumulation window, so every target token weighs the same however the batch was cut.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qlora_cli.data.pipeline import IGNORE_INDEX, Example, collate, epoch_batches
from qlora_cli.model.loading import model_autocast

# Architectures whose causal-LM head is exactly `logits = head(final hidden state)` (Gemma-2 adds soft-capping,
# handled). Others (e.g. logit scaling in Cohere or Granite) use the plain loss.
FUSED_CE_ARCHITECTURES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt2", "gpt_neox", "opt", "olmo", "olmo2"}
)


def loss_sum(model: Any, batch: dict[str, torch.Tensor], fused: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens) for one batch.

    batch: input_ids (B, T), labels (B, T) with IGNORE_INDEX where no loss is taken, and either
    attention_mask (B, T) (padded batches) or position_ids (B, T) (packed rows, see ``data.pipeline.collate_packed``).
    ``fused``: head + cross-entropy over target positions only, in chunks (``kernels.cross_entropy``), where
    the architecture allows it; the plain path otherwise.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if fused and supports_fused_cross_entropy(model):
        from qlora_cli.kernels.cross_entropy import fused_linear_cross_entropy

        with _head_detached(model) as (head, softcap):
            hidden = model(**inputs).logits  # (B, T, H): the model's output with the head taken off
        weight = head.weight  # read after the forward: under FSDP2 it is gathered by then
        chunk = max(64, min(8192, 2**26 // weight.shape[0]))  # ~256 MiB of float32 logits per chunk
        return fused_linear_cross_entropy(hidden, weight, batch["labels"], softcap, chunk)
    logits = model(**inputs).logits  # (B, T, V)
    # Shift the labels, not the logits: slicing (B, T, V) logits costs a copy and a zero-filled gradient.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t+1
    n = int((labels != IGNORE_INDEX).sum())
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),  # (B*T, V), float32 for a stable log-softmax
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, n


def _inner(model: Any) -> Any:
    return getattr(model, "module", model)  # under DDP the transformers model is .module


def supports_fused_cross_entropy(model: Any) -> bool:
    inner = _inner(model)
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return (
        getattr(config, "model_type", None) in FUSED_CE_ARCHITECTURES
        and isinstance(head, torch.nn.Linear)
        and type(head) is torch.nn.Linear  # not a LoRA-wrapped or quantized head
        and head.bias is None
        and not head.weight.requires_grad
    )


@contextmanager
def _head_detached(model: Any) -> Iterator[tuple[Any, float | None]]:
    """Within the block the model returns final hidden states in place of logits: its output head is an
    Identity and Gemma-2's soft-capping is off. Yields (head weight (V, H), soft-cap or None). The model is
    called through any DDP wrapper, so gradient synchronisation is untouched (the head is frozen). Yields the
    head module, whose weight is read after the forward (FSDP2 gathers it there)."""
    inner = _inner(model)
    head = inner.get_output_embeddings()
    name = next(n for n, m in inner.named_children() if m is head)
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    setattr(inner, name, torch.nn.Identity())
    if softcap is not None:
        inner.config.final_logit_softcapping = None
    try:
        yield head, softcap
    finally:
        setattr(inner, name, head)
        if softcap is not None:
            inner.config.final_logit_softcapping = softcap


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per target token
    n_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


@torch.no_grad()
def evaluate_loss(
    model: Any,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Any = None,
    fused: bool = False,
) -> EvalResult:
    """Token-weighted mean loss over ``examples`` (every target token counts once), model in eval mode,
    under ``autocast()`` (default: the model's own compute dtype, as training ran it).

    ``fused`` scores through the chunked head + cross-entropy, so evaluation never needs more memory for
    logits than training did."""
    was_training = model.training
    model.eval()
    total, n_total = 0.0, 0
    try:
        for idx in epoch_batches(len(examples), batch_size, 0, 0, shuffle=False):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with autocast() if autocast is not None else model_autocast(model):
                s, n = loss_sum(model, batch, fused)
            total += float(s)
            n_total += n
    finally:
        model.train(was_training)
    return EvalResult(total / max(n_total, 1), n_total)
