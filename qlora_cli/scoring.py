"""Greedy generation over token-id prompts (transformers' ``generate``, left-padded batches, the KV cache)
and the task metrics ``qlora eval`` reports: exact match and contains against the reference."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from qlora_cli.config import CHAT_TYPES
from qlora_cli.data.chat import DEFAULT, ChatOptions, conversation, prepared, render
from qlora_cli.data.pipeline import Row, prompt_and_target
from qlora_cli.model.loading import model_autocast, module_device

# ---------------------------------------------------------------------------------------------
# generation and task metrics


@dataclass
class GenerationCase:
    prompt_ids: list[int]
    reference: str


def generation_case(row: Row, fmt: str, tokenizer: Any, options: ChatOptions | None = None) -> GenerationCase | None:
    """The prompt the model sees and the answer it should give; None for ``text`` rows (no answer)."""
    if fmt in ("completion", "alpaca"):
        prompt, target = prompt_and_target(row, fmt)
        return GenerationCase(list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), target)
    if fmt in CHAT_TYPES:
        conv = prepared(conversation(row, options or row.chat or DEFAULT), tokenizer, row.where)
        messages = conv.messages
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        text = render(tokenizer, messages[:last], True, conv.tools, row.where)
        return GenerationCase(list(tokenizer(text, add_special_tokens=False)["input_ids"]), messages[last]["content"])
    return None


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    eos_token_ids: list[int] | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, cut after the first stop token) of token-id prompts.

    Prompts are sorted by length so a batch holds similar lengths (less padding), then left-padded so every
    row's last prompt token sits at the same position; the KV cache is on. The output keeps the input order.
    Runs under ``autocast()``; default: the model's own compute dtype (``model_autocast``), as training ran it.
    """
    was_training = model.training
    model.eval()
    device = module_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = list(dict.fromkeys(eos_token_ids or [tokenizer.eos_token_id]))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            chunk = [prompts[i] for i in idx]
            T = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # (B, T), left padded
            attention_mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for j, p in enumerate(chunk):
                input_ids[j, T - len(p) :] = torch.tensor(p, dtype=torch.long)
                attention_mask[j, T - len(p) :] = 1
            with autocast() if autocast is not None else model_autocast(model):
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    eos_token_id=stops,
                    pad_token_id=pad_id,
                )
            for j, row in zip(idx, out[:, T:].tolist()):
                cut = next((k for k, t in enumerate(row) if t in stops), len(row))
                outputs[j] = row[:cut]
    finally:
        model.train(was_training)
    return outputs


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    eos_token_ids: list[int] | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> list[str]:
    """Greedy completions for token-id prompts, decoded without special tokens (see ``generate_ids``)."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, eos_token_ids, autocast)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def contains(prediction: str, reference: str) -> bool:
    return normalize(reference) in normalize(prediction)


@dataclass
class TaskScore:
    exact_match: float
    contains: float
    n: int
    predictions: list[str]


def score_generations(
    model: Any,
    tokenizer: Any,
    cases: list[GenerationCase],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    eos_token_ids: list[int] | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> TaskScore:
    preds = generate(
        model, tokenizer, [c.prompt_ids for c in cases], max_new_tokens, batch_size, eos_token_ids, autocast
    )
    n = max(len(cases), 1)
    em = sum(exact_match(p, c.reference) for p, c in zip(preds, cases)) / n
    ct = sum(contains(p, c.reference) for p, c in zip(preds, cases)) / n
    return TaskScore(em, ct, len(cases), preds)
