"""Preference tuning's losses: DPO (sigmoid, robust, IPO), ORPO and KTO, on our LoRA layers.

The reference model is the same 4-bit base: inside ``model.lora.lora_reference`` every LoRA layer adds its
frozen reference weights (``ref_adapter``) or nothing (the base alone), so no second model is ever in memory.
A micro-batch of pairs runs chosen and rejected responses through the model in one batch, [chosen; rejected].

Each method's loss per pair (or per KTO response) follows TRL's trainers (``tests/test_preference.py`` compares
them on the same weights and batch); ``logp`` is a response's summed token log-probability under the policy,
``ref`` under the reference, ``ratio = logp - ref``, ``delta = ratio_chosen - ratio_rejected``:

    dpo sigmoid   -(1-ε) log σ(β delta) - ε log σ(-β delta)          (ε = label_smoothing: conservative DPO)
    dpo robust    (-(1-ε) log σ(β delta) + ε log σ(-β delta)) / (1-2ε)
    dpo ipo       (delta' - 1/(2β))²   with delta' from log-ratios averaged per response token
    orpo          NLL(chosen) - α log σ(log odds(chosen) - log odds(rejected)), odds from mean token log-probs
    kto           w_d (1 - σ(β(ratio - KL)))  or  w_u (1 - σ(β(KL - ratio))), KL = mean ratio of mismatched
                  prompt/response pairs of the micro-batch (each prompt with the previous row's response), ≥ 0

Within an optimizer step every pair (every KTO response) weighs the same however the step is cut into
micro-batches and processes, as every target token does in supervised training; ORPO's NLL term is token-weighted.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qlora_cli.data.pipeline import IGNORE_INDEX, Example, collate, epoch_batches
from qlora_cli.model.lora import lora_reference
from qlora_cli.train.loss import _head_detached, _inner, supports_fused_cross_entropy


@dataclass(frozen=True)
class Objective:
    """The config's preference keys, as the losses read them."""

    method: str  # dpo, orpo, kto
    beta: float = 0.1
    dpo_loss: str = "sigmoid"  # sigmoid, robust, ipo
    label_smoothing: float = 0.0
    orpo_alpha: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    nll_on_prompt: bool = False  # ORPO: the NLL term over prompt and response (TRL's ORPO) or the response only
    sequence_len: int = 512  # KTO's mismatched pairs are cut to it

    @classmethod
    def from_config(cls, cfg: Any) -> Objective:
        return cls(
            method=cfg.method,
            beta=cfg.beta,
            dpo_loss=cfg.dpo_loss,
            label_smoothing=cfg.label_smoothing,
            orpo_alpha=cfg.orpo_alpha,
            desirable_weight=cfg.kto_desirable_weight,
            undesirable_weight=cfg.kto_undesirable_weight,
            nll_on_prompt=cfg.train_on_inputs,
            sequence_len=cfg.sequence_len,
        )

    @property
    def paired(self) -> bool:
        return self.method in ("dpo", "orpo")

    @property
    def has_reference(self) -> bool:
        return self.method != "orpo"


METRICS = ("items", "loss_items", "nll", "nll_tokens", "chosen", "n_chosen", "rejected", "n_rejected", "correct")
METRICS += ("margin", "pairs", "log_odds", "kl", "kl_batches")


@dataclass
class Sums:
    """What a micro-batch adds up: the loss terms and the logged quantities, summed (``means`` divides)."""

    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))

    def add(self, other: Sums | dict[str, float]) -> None:
        for k, v in (other.values if isinstance(other, Sums) else other).items():
            self.values[k] = self.values.get(k, 0.0) + float(v)

    def loss(self) -> float:
        """The step's loss: mean per-pair (per-response) loss, plus ORPO's mean NLL per token."""
        v = self.values
        loss = v["loss_items"] / max(v["items"], 1)
        return loss + (v["nll"] / max(v["nll_tokens"], 1) if v["nll_tokens"] else 0.0)

    def means(self, prefix: str = "") -> dict[str, float]:
        """The logged numbers: loss, rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin, and
        ORPO's nll and log_odds_ratio or KTO's kl, where they apply."""
        v = self.values
        out = {f"{prefix}loss": self.loss()}
        if v["n_chosen"]:
            out[f"{prefix}rewards/chosen"] = v["chosen"] / v["n_chosen"]
        if v["n_rejected"]:
            out[f"{prefix}rewards/rejected"] = v["rejected"] / v["n_rejected"]
        if v["pairs"]:
            out[f"{prefix}rewards/accuracy"] = v["correct"] / v["pairs"]
            out[f"{prefix}rewards/margin"] = v["margin"] / v["pairs"]
        if v["nll_tokens"]:
            out[f"{prefix}nll"] = v["nll"] / v["nll_tokens"]
            out[f"{prefix}log_odds_ratio"] = v["log_odds"] / max(v["pairs"], 1)
        if v["kl_batches"]:
            out[f"{prefix}kl"] = v["kl"] / v["kl_batches"]
        return out


def step_counts(objective: Objective, rows: list[list[Example]]) -> tuple[int, int]:
    """(pairs or responses, ORPO's NLL tokens) in ``rows``: the step's normalisers."""
    items = len(rows)
    tokens = sum(_nll_targets(r[0], objective) for r in rows) if objective.method == "orpo" else 0
    return items, tokens


def _nll_targets(e: Example, objective: Objective) -> int:
    return len(e.input_ids) - 1 if objective.nll_on_prompt else e.n_targets


# ---------------------------------------------------------------------------------------------
# log-probabilities


def token_logps(model: Any, batch: dict[str, torch.Tensor], fused: bool = False) -> torch.Tensor:
    """(B, T-1) float32: log p(token t+1 | tokens ≤ t) where ``labels`` has a target, 0 elsewhere."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    labels = batch["labels"]
    if fused and supports_fused_cross_entropy(model):
        from qlora_cli.kernels.cross_entropy import fused_linear_token_logps

        with _head_detached(model) as (head, softcap):
            hidden = model(**inputs).logits  # final hidden states: the head is taken off
        weight = head.weight
        chunk = max(64, min(8192, 2**26 // weight.shape[0]))
        return fused_linear_token_logps(hidden, weight, labels, softcap, chunk)
    logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return logp * mask


def _all_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels on every real token (ORPO's NLL over prompt and response)."""
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)


def sequence_logps(
    model: Any,
    seqs: list[Example],
    device: torch.device,
    pad_id: int,
    pad_multiple: int = 1,
    fused: bool = False,
    reference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probabilities (N,), response tokens (N,)) of ``seqs``; ``reference``: under the
    reference model, without gradients."""
    batch = {k: v.to(device) for k, v in collate(seqs, pad_id, pad_multiple).items()}
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    context = lora_reference(_inner(model)) if reference else nullcontext()
    with torch.no_grad() if reference else nullcontext(), context:
        logp = token_logps(_inner(model) if reference else model, batch, fused)
    return (logp * mask).sum(1), mask.sum(1)


# ---------------------------------------------------------------------------------------------
# one micro-batch


def micro_batch_loss(
    model: Any,
    rows: list[list[Example]],
    objective: Objective,
    *,
    device: torch.device,
    pad_id: int,
    pad_multiple: int = 1,
    fused: bool = False,
    item_scale: float = 1.0,
    token_scale: float = 1.0,
) -> tuple[torch.Tensor, Sums]:
    """The micro-batch's loss to backpropagate (per-pair losses x ``item_scale`` + ORPO's NLL token sum x
    ``token_scale``) and its ``Sums``. Call under the run's autocast."""
    examples = [r[0] for r in rows]
    seqs = examples + [e.rejected for e in examples] if objective.paired else examples
    batch = {k: v.to(device) for k, v in collate(seqs, pad_id, pad_multiple).items()}
    response = batch["labels"][:, 1:] != IGNORE_INDEX
    scored = dict(batch)
    if objective.method == "orpo" and objective.nll_on_prompt:
        scored["labels"] = _all_tokens(batch)  # a superset of the response tokens
    logp_tok = token_logps(model, scored, fused)
    logps, counts = (logp_tok * response).sum(1), response.sum(1)
    ref = None
    if objective.has_reference:
        if all(s.ref_logp is not None for s in seqs):
            ref = torch.tensor([s.ref_logp for s in seqs], device=device, dtype=torch.float32)
        else:
            ref, _ = sequence_logps(model, seqs, device, pad_id, pad_multiple, fused, reference=True)
    sums = Sums()
    if objective.method == "dpo":
        losses = _dpo(objective, logps, counts, ref, sums)
    elif objective.method == "orpo":
        losses = _orpo(objective, logps, counts, sums)
        n = len(examples)
        nll_mask = (scored["labels"][:n, 1:] != IGNORE_INDEX) if objective.nll_on_prompt else response[:n]
        nll = -(logp_tok[:n] * nll_mask).sum()
        sums.add({"nll": nll.detach(), "nll_tokens": nll_mask.sum()})
        total = losses.sum() * item_scale + nll * token_scale
        sums.add({"items": len(losses), "loss_items": losses.detach().sum()})
        return total, sums
    else:
        kl = _kto_kl(model, examples, objective, device, pad_id, pad_multiple, fused)
        losses = _kto(objective, examples, logps, ref, kl, sums)
    sums.add({"items": len(losses), "loss_items": losses.detach().sum()})
    return losses.sum() * item_scale, sums


def _dpo(
    objective: Objective, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor, sums: Sums
) -> torch.Tensor:
    beta, eps = objective.beta, objective.label_smoothing
    chosen, rejected = (logps - ref).chunk(2)  # log-ratios
    if objective.dpo_loss == "ipo":
        n_chosen, n_rejected = counts.chunk(2)
        delta = chosen / n_chosen.clamp(min=1) - rejected / n_rejected.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        delta = chosen - rejected
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        if objective.dpo_loss == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    _pair_rewards(sums, beta * chosen.detach(), beta * rejected.detach())
    return losses


def _pair_rewards(sums: Sums, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    sums.add(
        {
            "chosen": chosen.sum(),
            "n_chosen": len(chosen),
            "rejected": rejected.sum(),
            "n_rejected": len(rejected),
            "correct": (chosen > rejected).sum(),
            "margin": (chosen - rejected).sum(),
            "pairs": len(chosen),
        }
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _orpo(objective: Objective, logps: torch.Tensor, counts: torch.Tensor, sums: Sums) -> torch.Tensor:
    mean = logps / counts.clamp(min=1)  # mean token log-probability of each response
    chosen, rejected = mean.chunk(2)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    _pair_rewards(sums, objective.orpo_alpha * chosen.detach(), objective.orpo_alpha * rejected.detach())
    sums.add({"log_odds": ratio.detach().sum()})
    return -objective.orpo_alpha * ratio


def mismatched(examples: list[Example], sequence_len: int) -> list[Example]:
    """KTO's KL pairs: each example's prompt with the previous example's response (the first takes the last's),
    as TRL's KTO builds them, skipping back over rows with the same prompt (a pair split into two labelled
    responses) so that a response never meets its own prompt where another is at hand; cut to ``sequence_len``."""
    out = []
    for i, e in enumerate(examples):
        prompt = e.input_ids[: e.prompt_len]
        others = [examples[i - k] for k in range(1, len(examples))]
        different = [o for o in others if o.input_ids[: o.prompt_len] != prompt]
        other = different[0] if different else examples[i - 1]
        ids = e.input_ids[: e.prompt_len] + other.input_ids[other.prompt_len :]
        labels = [IGNORE_INDEX] * e.prompt_len + other.labels[other.prompt_len :]
        out.append(Example(ids[:sequence_len], labels[:sequence_len], prompt_len=e.prompt_len))
    return out


def _kto_kl(
    model: Any,
    examples: list[Example],
    objective: Objective,
    device: torch.device,
    pad_id: int,
    pad_multiple: int,
    fused: bool,
) -> torch.Tensor:
    pairs = mismatched(examples, objective.sequence_len)
    with torch.no_grad():
        policy, _ = sequence_logps(_inner(model), pairs, device, pad_id, pad_multiple, fused)
    reference, _ = sequence_logps(model, pairs, device, pad_id, pad_multiple, fused, reference=True)
    return (policy - reference).mean().clamp(min=0)


def _kto(
    objective: Objective, examples: list[Example], logps: torch.Tensor, ref: torch.Tensor, kl: torch.Tensor, sums: Sums
) -> torch.Tensor:
    beta = objective.beta
    desirable = torch.tensor([bool(e.label) for e in examples], device=logps.device)
    ratio = logps - ref
    losses = torch.where(
        desirable,
        objective.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        objective.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    rewards = beta * ratio.detach()
    sums.add(
        {
            "chosen": rewards[desirable].sum(),
            "n_chosen": desirable.sum(),
            "rejected": rewards[~desirable].sum(),
            "n_rejected": (~desirable).sum(),
            "kl": kl,
            "kl_batches": 1,
        }
    )
    return losses


# ---------------------------------------------------------------------------------------------
# whole datasets


@torch.no_grad()
def precompute_reference(
    model: Any, examples: list[Example], batch_size: int, device: torch.device, pad_id: int, autocast: Any, fused: bool
) -> None:
    """Set ``ref_logp`` of every response (chosen and rejected) once, so steps skip the reference forward."""
    seqs = [s for e in examples for s in ((e, e.rejected) if e.rejected is not None else (e,))]
    was_training = model.training
    model.eval()
    try:
        for idx in epoch_batches(len(seqs), batch_size, 0, 0, shuffle=False):
            part = [seqs[i] for i in idx]
            with autocast():
                ref, _ = sequence_logps(model, part, device, pad_id, 1, fused, reference=True)
            for s, value in zip(part, ref.tolist()):
                s.ref_logp = value
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_preferences(
    model: Any,
    examples: list[Example],
    objective: Objective,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    autocast: Any,
    fused: bool = False,
) -> Sums:
    """The preference loss and rewards over ``examples``, the model in eval mode."""
    was_training = model.training
    model.eval()
    sums = Sums()
    try:
        for idx in epoch_batches(len(examples), batch_size, 0, 0, shuffle=False):
            rows = [[examples[i]] for i in idx]
            with autocast():
                _, part = micro_batch_loss(model, rows, objective, device=device, pad_id=pad_id, fused=fused)
            sums.add(part)
    finally:
        model.train(was_training)
    return sums


def accumulate_preferences(
    model: Any,
    micro_batches: list[list[list[Example]]],
    objective: Objective,
    *,
    device: torch.device,
    precision: Any,
    pad_id: int,
    pad_multiple: int = 1,
    fused: bool = False,
    n_items: int,
    n_tokens: int = 0,
    world_size: int = 1,
    seeds: list[int] | None = None,
    no_sync: Any = nullcontext,
) -> tuple[Sums, int]:
    """Forward and backward over one optimizer step's micro-batches on this process, as
    ``step.accumulate_gradients`` does for supervised targets: each pair weighs 1/``n_items`` of the step's
    loss (``n_items``: pairs of the whole step on every process), ORPO's NLL tokens 1/``n_tokens``.
    Returns (this process's ``Sums``, its real tokens)."""
    sums, real = Sums(), 0
    for j, rows in enumerate(micro_batches):
        if seeds is not None:
            torch.manual_seed(seeds[j])
        last = j == len(micro_batches) - 1
        with nullcontext() if last else no_sync(model):
            with precision.autocast():
                loss, part = micro_batch_loss(
                    model,
                    rows,
                    objective,
                    device=device,
                    pad_id=pad_id,
                    pad_multiple=pad_multiple,
                    fused=fused,
                    item_scale=world_size / max(n_items, 1),
                    token_scale=world_size / max(n_tokens, 1),
                )
            precision.backward(loss)
        sums.add(part)
        real += sum(len(s.input_ids) for r in rows for s in (r[0], r[0].rejected) if s is not None)
    return sums, real
