"""Task metrics: greedy generation against reference answers (exact match, contains).

Prompts are tokenized exactly as in training (``data.tokenize_row`` builds the same prefix), batched with
left padding and decoded with the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlora_cli.data import Row, chat_messages, prompt_and_target


@dataclass
class GenerationCase:
    prompt_ids: list[int]
    reference: str


def generation_case(row: Row, fmt: str, tokenizer: Any) -> GenerationCase | None:
    """The prompt the model sees and the answer it should give; None for ``text`` rows (no answer)."""
    if fmt in ("completion", "alpaca"):
        prompt, target = prompt_and_target(row, fmt)
        return GenerationCase(list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), target)
    if fmt == "chat":
        messages = chat_messages(row)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return GenerationCase(list(tokenizer(text, add_special_tokens=False)["input_ids"]), messages[last]["content"])
    return None


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    """Greedy completions for token-id prompts, decoded without special tokens.

    Batches are left-padded so every row's last prompt token sits at the same position; the KV cache is on.
    """
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    pad_id = tokenizer.pad_token_id
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            T = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, T - len(p) :] = torch.tensor(p)
                attention_mask[i, T - len(p) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
            )
            for row in out[:, T:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


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
    model: Any, tokenizer: Any, cases: list[GenerationCase], max_new_tokens: int = 32, batch_size: int = 16
) -> TaskScore:
    preds = generate(model, tokenizer, [c.prompt_ids for c in cases], max_new_tokens, batch_size)
    n = max(len(cases), 1)
    em = sum(exact_match(p, c.reference) for p, c in zip(preds, cases)) / n
    ct = sum(contains(p, c.reference) for p, c in zip(preds, cases)) / n
    return TaskScore(em, ct, len(cases), preds)
