"""Datasets -> token ids + labels -> padded batches.

Four row formats, each ending in EOS, which is always a target token (also when pad == eos, because the
attention mask and label padding come from lengths, never from comparing ids with the pad id):

    completion  {"prompt", "completion"}             prompt | completion EOS
    alpaca      {"instruction", "input"?, "output"}  Alpaca prompt | output EOS
    chat        {"messages": [{"role", "content"}]}  tokenizer's chat template; targets = assistant turns
    text        {"text"}                             text EOS, every token a target

Labels are -100 where no loss is taken (the prompt, unless ``train_on_inputs``). Prompt and target are
tokenized separately and concatenated, so the boundary is exact and generation at eval time sees exactly
the prompt tokens the model was trained on.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from qlora_cli.config import CHAT_TYPES, PREFERENCE_TYPES, DatasetSpec, DataSettings
from qlora_cli.data.chat import DEFAULT, assistant_spans, chat_messages, conversation, encode, render, tokenize_chat
from qlora_cli.data.examples import IGNORE_INDEX, DataStats, Example
from qlora_cli.data.sources import Row, read_rows
from qlora_cli.errors import DataError

__all__ = ["IGNORE_INDEX", "DataStats", "Example", "Row", "assistant_spans", "chat_messages", "read_rows"]

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

REQUIRED_FIELDS = {
    "completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}


@dataclass
class TrainData:
    train: list[Example]
    eval: list[Example]
    train_stats: DataStats
    eval_stats: DataStats
    mixture: list[MixturePart] | None = None  # a weighted mixture as drawn for the first epoch
    pools: list[tuple[DatasetSpec, list[Example]]] | None = None  # a mixture's datasets whole: later epochs redraw


@dataclass
class MixturePart:
    """One dataset's share of a mixture, as drawn: its examples, and those drawn for training."""

    path: str
    examples: int  # after tokenization (truncated-away rows dropped)
    drawn: int
    tokens: int
    target_tokens: int


# ---------------------------------------------------------------------------------------------
# rows -> prompt/target text


def _field(row: Row, name: str, fmt: str, optional: bool = False) -> str:
    if name not in row.fields or (row.fields[name] is None and not optional):
        needed = ", ".join(REQUIRED_FIELDS[fmt])
        text_row = fmt == "completion" and "text" in row.fields  # Axolotl's type: completion reads `text`
        hint = "; a row with a 'text' field is type: text" if text_row else ""
        raise DataError(f"{row.where}: row is missing field '{name}' (type {fmt} needs {needed}){hint}")
    value = row.fields[name]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def prompt_and_target(row: Row, fmt: str) -> tuple[str, str]:
    """(prompt text, target text) for completion and alpaca rows; EOS is added at tokenization."""
    if fmt == "completion":
        return _field(row, "prompt", fmt), _field(row, "completion", fmt)
    if fmt == "alpaca":
        instruction = _field(row, "instruction", fmt)
        inp = _field(row, "input", fmt, optional=True) if "input" in row.fields else ""
        output = _field(row, "output", fmt)
        template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        return template.format(instruction=instruction, input=inp), output
    raise ValueError(f"prompt_and_target does not handle {fmt}")


# ---------------------------------------------------------------------------------------------
# tokenization


def tokenize_row(row: Row, fmt: str, tokenizer: Any, train_on_inputs: bool) -> Example:
    """One row -> token ids and labels (untruncated)."""
    eos = tokenizer.eos_token_id
    if fmt in ("completion", "alpaca"):
        prompt, target = prompt_and_target(row, fmt)
        prompt_ids = encode(tokenizer, prompt, special=True)
        target_ids = encode(tokenizer, target, special=False) + [eos]
        ids = prompt_ids + target_ids
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + target_ids
        return Example(ids, labels)
    if fmt == "text":
        ids = encode(tokenizer, _field(row, "text", fmt), special=True) + [eos]
        return Example(ids, list(ids))
    if fmt in CHAT_TYPES:
        return tokenize_chat(row, tokenizer, train_on_inputs, row.chat or DEFAULT)
    if fmt in PREFERENCE_TYPES:  # the chosen response (its .rejected attached), or KTO's labelled one
        from qlora_cli.data.preference import tokenize_preference_rows

        (ex,), _ = tokenize_preference_rows([row], fmt, tokenizer, sequence_len=2**31)
        return ex
    raise ValueError(fmt)


def tokenize_dataset(spec: DatasetSpec, tokenizer: Any, settings: DataSettings) -> tuple[list[Example], DataStats]:
    rows = read_rows(spec)
    if spec.type in PREFERENCE_TYPES:  # pairs or labelled responses; quick to tokenize, not cached
        from qlora_cli.data.preference import tokenize_preference_rows

        return tokenize_preference_rows(rows, spec.type, tokenizer, settings.sequence_len)
    return tokenize_some(spec, rows, tokenizer, settings)


def tokenize_block(spec: DatasetSpec, rows: list[Row], tokenizer: Any, settings: DataSettings) -> list[Example]:
    """The examples of one streamed block of ``spec``'s rows (``data.stream``), through the cache like a dataset."""
    return tokenize_some(spec, rows, tokenizer, settings)[0]


def tokenize_some(
    spec: DatasetSpec, rows: list[Row], tokenizer: Any, settings: DataSettings
) -> tuple[list[Example], DataStats]:
    with_run_settings(rows, settings)
    if spec.type in CHAT_TYPES and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"dataset {spec.path} has type {spec.type} but the tokenizer has no chat template; "
            "set chat_template to a name (chatml, llama3, ...) or a Jinja template in the config"
        )
    if not settings.cache:
        return tokenize_rows(rows, spec.type, tokenizer, settings)
    from qlora_cli.data.cache import cached_tokenize

    def rebuild(items: list[tuple[list[int], list[int], int]], stats: dict) -> tuple[list[Example], DataStats]:
        examples = []
        for ids, labels, r in items:
            ex = Example(ids, labels)
            ex.row, ex.fmt = rows[r], spec.type
            examples.append(ex)
        return examples, DataStats(**stats)

    examples, stats, hit = cached_tokenize(
        rows, spec.type, tokenizer, settings, tokenize_rows, rebuild, strict=settings.cache_required
    )
    CACHE_EVENTS.append((spec.path, hit))
    return examples, stats


CACHE_EVENTS: list[tuple[str, bool]] = []  # (dataset path, loaded from the cache) per tokenized entry, for reports


def with_run_settings(rows: list[Row], settings: DataSettings) -> None:
    """Give chat rows the run's ``train_on`` and ``train_on_reasoning`` beside their dataset's roles and tools."""
    done: dict[int, Any] = {}
    for row in rows:
        if row.chat is None and "messages" not in row.fields and "conversations" not in row.fields:
            continue
        base = row.chat or DEFAULT
        if id(base) not in done:
            done[id(base)] = replace(base, train_on=settings.train_on, train_on_reasoning=settings.train_on_reasoning)
        row.chat = done[id(base)]


def tokenize_rows(rows: list[Row], fmt: str, tokenizer: Any, settings: DataSettings) -> tuple[list[Example], DataStats]:
    with_run_settings(rows, settings)
    stats = DataStats(rows=len(rows))
    examples = []
    for row, ex in zip(rows, tokenize_many(rows, fmt, tokenizer, settings.train_on_inputs, settings.num_proc)):
        ex.row, ex.fmt = row, fmt
        if len(ex.input_ids) > settings.sequence_len:
            ex.input_ids, ex.labels = ex.input_ids[: settings.sequence_len], ex.labels[: settings.sequence_len]
            stats.truncated += 1
        if ex.n_targets == 0:
            stats.dropped += 1
            continue
        examples.append(ex)
        stats.tokens += len(ex.input_ids)
        stats.target_tokens += ex.n_targets
    stats.examples = len(examples)
    return examples, stats


PARALLEL_MIN_ROWS = 2048  # fewer rows tokenize faster than worker processes start
BATCH_ROWS = 1024  # texts per call of a fast tokenizer


def tokenize_many(rows: list[Row], fmt: str, tokenizer: Any, train_on_inputs: bool, num_proc: int = 1) -> list[Example]:
    """``tokenize_row`` of every row, the same tokens: a fast tokenizer gets completion, alpaca and text rows in
    batches (its Rust side runs them in parallel); chat rows (templates render in Python) and slow tokenizers,
    with ``num_proc`` > 1 and many rows, go in chunks to that many forked worker processes. (Measured: for
    alpaca rows on a fast tokenizer, processes were slower than one process's batches.)"""
    import multiprocessing

    python_bound = fmt in CHAT_TYPES or not getattr(tokenizer, "is_fast", False)  # else batches beat processes
    if (
        python_bound
        and num_proc > 1
        and len(rows) >= PARALLEL_MIN_ROWS
        and "fork" in multiprocessing.get_all_start_methods()
    ):
        global _WORK
        n = min(num_proc, -(-len(rows) // (PARALLEL_MIN_ROWS // 2)))
        bounds = [(len(rows) * i // n, len(rows) * (i + 1) // n) for i in range(n)]
        _WORK = (rows, fmt, tokenizer, train_on_inputs)
        quiet = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker is one process; no fork warning
        try:
            with multiprocessing.get_context("fork").Pool(n) as pool:
                parts = pool.map(_tokenize_chunk, bounds)
        finally:
            _WORK = None
            if quiet is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = quiet
        return [Example(ids, labels) for part in parts for ids, labels in part]
    return _tokenize_serial(rows, fmt, tokenizer, train_on_inputs)


_WORK: tuple[list[Row], str, Any, bool] | None = None  # what forked workers tokenize (inherited, never pickled)


def _tokenize_chunk(bounds: tuple[int, int]) -> list[tuple[list[int], list[int]]]:
    assert _WORK is not None
    rows, fmt, tokenizer, train_on_inputs = _WORK
    return [
        (e.input_ids, e.labels) for e in _tokenize_serial(rows[bounds[0] : bounds[1]], fmt, tokenizer, train_on_inputs)
    ]


def _tokenize_serial(rows: list[Row], fmt: str, tokenizer: Any, train_on_inputs: bool) -> list[Example]:
    if fmt in CHAT_TYPES or not getattr(tokenizer, "is_fast", False):
        return [tokenize_row(row, fmt, tokenizer, train_on_inputs) for row in rows]
    out = []
    eos = tokenizer.eos_token_id
    for at in range(0, len(rows), BATCH_ROWS):
        chunk = rows[at : at + BATCH_ROWS]
        if fmt == "text":
            texts = [_field(row, "text", fmt) for row in chunk]
            for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
                ids = list(ids) + [eos]
                out.append(Example(ids, list(ids)))
            continue
        pairs = [prompt_and_target(row, fmt) for row in chunk]
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
        targets = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
        for prompt_ids, target_ids in zip(prompts, targets):
            prompt_ids, target_ids = list(prompt_ids), list(target_ids) + [eos]
            ids = prompt_ids + target_ids
            labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + target_ids
            out.append(Example(ids, labels))
    return out


def build_datasets(settings: DataSettings, tokenizer: Any) -> TrainData:
    """Tokenize the training and eval datasets. Raises ``DataError`` when nothing is left to train on."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set one in the tokenizer files")
    train, train_stats, mixture, pools = _tokenize_all(settings.datasets, tokenizer, settings, mix=True)
    if not train:
        raise DataError(
            f"no training examples left: all {train_stats.rows} rows were truncated away at sequence_len="
            f"{settings.sequence_len} or have no target tokens"
        )
    if not settings.allow_degenerate:
        check_not_degenerate(train, tokenizer)
    eval_examples, eval_stats, _, _ = _tokenize_all(settings.eval_datasets, tokenizer, settings)
    if not settings.eval_datasets and settings.val_set_size > 0:
        order = list(range(len(train)))
        random.Random(settings.seed).shuffle(order)
        n_val = max(1, round(len(train) * settings.val_set_size))
        if n_val >= len(train):
            raise DataError(f"val_set_size={settings.val_set_size} leaves no training examples out of {len(train)}")
        val_idx = set(order[:n_val])
        eval_examples = [ex for i, ex in enumerate(train) if i in val_idx]
        train = [ex for i, ex in enumerate(train) if i not in val_idx]
        eval_stats = DataStats(
            examples=len(eval_examples),
            tokens=sum(len(s.input_ids) for e in eval_examples for s in _sequences(e)),
            target_tokens=sum(s.n_targets for e in eval_examples for s in _sequences(e)),
        )
        train_stats.examples = len(train)
        train_stats.tokens -= eval_stats.tokens
        train_stats.target_tokens -= eval_stats.target_tokens
    if settings.unpaired:  # KTO: each pair becomes its two labelled responses, after the split
        from qlora_cli.data.preference import unpair

        pools = None  # a KTO mixture keeps its first draw (its pools are pairs)
        train, eval_examples = unpair(train), unpair(eval_examples)
        train_stats.examples, eval_stats.examples = len(train), len(eval_examples)
    return TrainData(train, eval_examples, train_stats, eval_stats, mixture, pools)


def build_eval_only(settings: DataSettings, tokenizer: Any) -> TrainData:
    """The eval datasets alone (a streamed run reads its training data as it goes: ``data.stream``)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set one in the tokenizer files")
    eval_examples, eval_stats, _, _ = _tokenize_all(settings.eval_datasets, tokenizer, settings)
    return TrainData([], eval_examples, DataStats(), eval_stats)


def _sequences(e: Example) -> tuple[Example, ...]:
    """The sequences an example runs: itself, and the rejected response of a preference pair."""
    return (e,) if e.rejected is None else (e, e.rejected)


def _tokenize_all(
    specs: list[DatasetSpec], tokenizer: Any, settings: DataSettings, mix: bool = False
) -> tuple[list[Example], DataStats, list[MixturePart] | None, list[tuple[DatasetSpec, list[Example]]] | None]:
    examples: list[Example] = []
    total = DataStats()
    parts = []
    for spec in specs:
        some, stats = tokenize_dataset(spec, tokenizer, settings)
        parts.append((spec, some))
        total.add(stats)
    if not (mix and any(s.weight is not None or s.count is not None for s in specs)):
        return [e for _, some in parts for e in some], total, None, None
    examples, mixture = draw_mixture(parts, settings.seed)
    total.examples = len(examples)
    total.tokens = sum(p.tokens for p in mixture)
    total.target_tokens = sum(p.target_tokens for p in mixture)
    return examples, total, mixture, parts


def draw_mixture(
    parts: list[tuple[DatasetSpec, list[Example]]], seed: int, epoch: int = 0
) -> tuple[list[Example], list[MixturePart]]:
    """The examples a weighted mixture trains on in ``epoch`` (``mixture_counts`` of each dataset, drawn under
    ``seed`` and the epoch: the same draw on every run and resume, a new one each epoch), and what was drawn per
    dataset."""
    examples: list[Example] = []
    mixture = []
    for i, ((spec, some), n) in enumerate(zip(parts, mixture_counts([(s, len(e)) for s, e in parts]))):
        order = list(range(len(some)))
        random.Random(f"{seed}:{i}:{spec.path}" + (f":{epoch}" if epoch else "")).shuffle(order)
        drawn = [some[j] for j in sorted(order[:n])]
        examples.extend(drawn)
        mixture.append(MixturePart(spec.path, len(some), n, sum(len(e.input_ids) for e in drawn),
                                   sum(e.n_targets for e in drawn)))  # fmt: skip
    return examples, mixture


def mixture_counts(parts: list[tuple[DatasetSpec, int]]) -> list[int]:
    """Examples drawn from each dataset: a ``count`` exactly; the weighted ones in proportion to their weights,
    as many as the first of them to run out allows (each example drawn at most once). ``DataError`` for a
    count larger than its dataset."""
    weighted = [(spec, n) for spec, n in parts if spec.weight is not None]
    empty = next((spec for spec, n in weighted if n == 0), None)
    if empty is not None:
        raise DataError(f"dataset {empty.path} has no training examples left, so its weight cannot be met")
    total_weight = sum(spec.weight for spec, _ in weighted)
    epoch = min((n * total_weight / spec.weight for spec, n in weighted), default=0.0)
    counts = []
    for spec, n in parts:
        if spec.count is not None:
            if spec.count > n:
                raise DataError(
                    f"dataset {spec.path} runs dry under the mixture: count {spec.count} asks for more examples "
                    f"than its {n}; lower the count (or give it a weight)"
                )
            counts.append(spec.count)
        else:
            counts.append(min(n, max(1, math.floor(epoch * spec.weight / total_weight + 1e-9))))
    return counts


# ---------------------------------------------------------------------------------------------
# a guard against training on nonsense

DEGENERATE_OVERRIDE = "set allow_degenerate_data: true to train anyway"
PROMPT_SAMPLE = 64  # chat rows re-rendered to look for their prompts; enough to tell a broken template


def check_not_degenerate(examples: list[Example], tokenizer: Any) -> None:
    """Refuse data that can only train nonsense, in one line saying what was seen. Each check needs *every*
    example to look wrong, so one odd row never stops a run: every example has fewer than 2 target tokens
    (e.g. a template that drops the assistant turns), every example is the same token sequence (a template
    that ignores the messages), or no chat row's user text appears in what its template renders.
    Raises ``DataError``."""
    if not examples:
        return
    most = max(e.n_targets for e in examples)
    if most < 2:
        raise DataError(
            f"every training example has fewer than 2 target tokens (at most {most}, {len(examples)} examples); "
            f"the model would learn nothing but EOS; check the data format and chat_template, or {DEGENERATE_OVERRIDE}"
        )
    first = examples[0].input_ids
    if len(examples) > 1 and all(e.input_ids == first for e in examples):
        shown = tokenizer.decode(first)[:60]
        raise DataError(
            f"all {len(examples)} training examples are the same tokens ({shown!r}); check the data format and "
            f"chat_template, or {DEGENERATE_OVERRIDE}"
        )
    chats = [e for e in examples if e.fmt in CHAT_TYPES and e.row is not None][:PROMPT_SAMPLE]
    if chats and all(_lost_prompt(e.row, tokenizer) for e in chats):
        raise DataError(
            f"the user messages of {chats[0].row.where} (and of every chat example checked) do not appear in the "
            f"text the chat template renders; check chat_template, or {DEGENERATE_OVERRIDE}"
        )


def _lost_prompt(row: Row, tokenizer: Any) -> bool:
    """True when some user message of the row is missing from its rendered conversation."""
    conv = conversation(row, row.chat or DEFAULT)
    messages = conv.messages
    rendered = render(tokenizer, messages, False, conv.tools, row.where)
    return any(m["content"].strip() not in rendered for m in messages if m["role"] == "user" and m["content"].strip())


# ---------------------------------------------------------------------------------------------
# batching


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. The mask comes from lengths, so a pad id equal to EOS is harmless.

    Returns input_ids (B, T), attention_mask (B, T), labels (B, T) with IGNORE_INDEX on padding.
    """
    longest = max(len(e.input_ids) for e in examples)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_examples(examples: list[Example], sequence_len: int) -> list[list[int]]:
    """Group example indices into rows of at most ``sequence_len`` tokens (first-fit decreasing).

    Deterministic: the same examples always give the same packs; the training loop shuffles the packs.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for b, free in enumerate(room):  # few bins have room for long examples; fine at fine-tuning sizes
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(sequence_len - n)
    return bins


def packing_efficiency(examples: list[Example], packs: list[list[int]], sequence_len: int) -> float:
    """Real tokens / (rows x sequence_len): the share of a packed batch that is not padding."""
    return sum(len(e.input_ids) for e in examples) / max(len(packs) * sequence_len, 1)


def collate_packed(rows: list[list[Example]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples into one sequence whose position ids restart at every example.

    With no attention mask, transformers builds a block-diagonal causal mask from those position ids, so
    no token attends across an example boundary. Each example's first token is not a target (in an
    unpacked batch nothing predicts it either). The padding tail is a segment of its own.
    Returns input_ids, position_ids, labels (B, T) and token_mask (B, T) (1 on real tokens, for counting).
    """
    lengths = [sum(len(e.input_ids) for e in row) for row in rows]
    T = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    token_mask = torch.zeros((B, T), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[i, at : at + n] = torch.tensor(e.input_ids)
            labels[i, at + 1 : at + n] = torch.tensor(e.labels[1:])
            position_ids[i, at : at + n] = torch.arange(n)
            at += n
        token_mask[i, :at] = 1
        position_ids[i, at:] = torch.arange(T - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "token_mask": token_mask}


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Index lists of one epoch's micro-batches, shuffled by (seed, epoch) so a resumed run sees the same order."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(n_examples, generator=g).tolist()
    else:
        order = list(range(n_examples))
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]
