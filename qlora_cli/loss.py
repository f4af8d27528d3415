"""The causal-LM loss, summed over target tokens, and token-weighted evaluation.

Summing (not averaging) per micro-batch lets the training loop divide by the number of target tokens in
the whole accumulation window, so every target token weighs the same however the batch was cut.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qlora_cli.data import IGNORE_INDEX, Example, collate, epoch_batches


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens) for one batch.

    batch: input_ids (B, T), labels (B, T) with IGNORE_INDEX where no loss is taken, and either
    attention_mask (B, T) (padded batches) or position_ids (B, T) (packed rows, see ``data.collate_packed``).
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits  # (B, T, V)
    shift_logits = logits[:, :-1, :]  # position t predicts token t+1
    shift_labels = batch["labels"][:, 1:]
    n = int((shift_labels != IGNORE_INDEX).sum())
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),  # (B*(T-1), V), float32 for a stable log-softmax
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, n


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per target token
    n_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: list[Example], batch_size: int, pad_id: int, device: torch.device, autocast: Any = None
) -> EvalResult:
    """Token-weighted mean loss over ``examples`` (every target token counts once), model in eval mode."""
    was_training = model.training
    model.eval()
    total, n_total = 0.0, 0
    try:
        for idx in epoch_batches(len(examples), batch_size, 0, 0, shuffle=False):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with autocast() if autocast is not None else nullcontext():
                s, n = loss_sum(model, batch)
            total += float(s)
            n_total += n
    finally:
        model.train(was_training)
    return EvalResult(total / max(n_total, 1), n_total)
