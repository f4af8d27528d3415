"""The tokenization cache: tokenized examples of one dataset entry, reused while nothing that changes the
tokens has changed.

An entry is one safetensors file, ``cache_dir()/tokenized/<key>.safetensors``, whose key hashes everything
the tokens depend on: the rows as read (their content, so an edited file misses and a moved one hits), the
dataset ``type``, the tokenizer (its full definition: ``tokenizer.json`` of a fast tokenizer, the vocabulary
files of a slow one, special tokens, and the ids it gives a probe text), the chat template text,
``sequence_len``, ``train_on_inputs`` and ``TOKENS_VERSION`` (bumped when the tokenization code changes
what it produces). It holds the examples as tokenized and truncated (flat ``input_ids``/``labels``, one
length and source row index per example) and the counts ``DataStats`` reports.

An entry is written to a temporary file and renamed into place, so a reader sees a whole entry or none.
A read checks a checksum of the tensors and that lengths, row indices and row count agree; an entry that
fails (a truncated or altered file) is reported, rebuilt and never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qlora_cli.errors import DataError

# bump when data.pipeline.tokenize_row/tokenize_rows would produce different tokens for the same inputs, or the entry's
# format changes (2: the checksum covers the stats too)
TOKENS_VERSION = 2


def tokenized_dir() -> Path:
    from qlora_cli.cache import cache_dir

    return cache_dir() / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that decides the tokens qlora makes with it."""
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__name__}\n".encode())
    if getattr(tokenizer, "is_fast", False):
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        for value in sorted(str(v) for v in getattr(tokenizer, "init_kwargs", {}).values()):
            if len(value) < 4096 and os.path.isfile(value):  # sentencepiece model, merges, ...
                h.update(Path(value).read_bytes())
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    probe = tokenizer("Hello world\n  x", add_special_tokens=True)["input_ids"]  # add_bos/eos settings, ...
    h.update(json.dumps([special, ids, list(probe)], sort_keys=True, default=str).encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(
    rows: list[Any], fmt: str, tokenizer: Any, sequence_len: int, train_on_inputs: bool, chat: Any = None
) -> str:
    h = hashlib.sha256()
    head = {"v": TOKENS_VERSION, "fmt": fmt, "sequence_len": sequence_len, "train_on_inputs": train_on_inputs}
    if chat is not None:  # chat rows: train_on, train_on_reasoning, the dataset's roles and tools
        head["chat"] = chat
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(len(rows).to_bytes(8, "little"))
    for row in rows:
        h.update(json.dumps(row.fields, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def entry_path(key: str) -> Path:
    return tokenized_dir() / f"{key[:32]}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor], stats: str) -> str:
    h = hashlib.sha256(stats.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def save(key: str, examples: list[Any], row_index: list[int], n_rows: int, stats: Any) -> Path:
    """Write one entry atomically. Raises ``OSError`` when the cache folder cannot be written."""
    from safetensors.torch import save_file

    lengths = [len(e.input_ids) for e in examples]
    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64),
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "row_index": torch.tensor(row_index, dtype=torch.int64),
    }
    stats_text = json.dumps(asdict(stats))
    meta = {"key": key, "rows": str(n_rows), "stats": stats_text, "checksum": _checksum(tensors, stats_text)}
    path = entry_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class Corrupt(Exception):
    pass


def load(key: str, n_rows: int) -> tuple[list[tuple[list[int], list[int], int]], dict[str, int]] | None:
    """``([(input_ids, labels, row index), ...], stats)`` of the entry, or None when there is none.
    Raises ``Corrupt`` when the entry exists but does not check out."""
    from safetensors import safe_open

    path = entry_path(key)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        if set(tensors) != {"input_ids", "labels", "lengths", "row_index"}:
            raise Corrupt("unexpected tensors")
        stats_text = meta.get("stats", "")
        checksum = _checksum(tensors, stats_text)
        if meta.get("key") != key or meta.get("rows") != str(n_rows) or meta.get("checksum") != checksum:
            raise Corrupt("checksum or key mismatch")
        ids, labels, lengths, row_index = (tensors[k] for k in ("input_ids", "labels", "lengths", "row_index"))
        if ids.shape != labels.shape or int(lengths.sum()) != ids.numel() or lengths.shape != row_index.shape:
            raise Corrupt("shapes disagree")
        if row_index.numel() and (int(row_index.min()) < 0 or int(row_index.max()) >= n_rows):
            raise Corrupt("row index out of range")
        stats = json.loads(stats_text)
        if not isinstance(stats, dict):
            raise Corrupt("stats are not a JSON object")
    except Corrupt:
        raise
    except Exception as e:  # a truncated file, a bad header, bad JSON: all mean the same
        raise Corrupt(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    out = []
    for seq_ids, seq_labels, r in zip(
        ids.split(lengths.tolist()), labels.split(lengths.tolist()), row_index.tolist(), strict=True
    ):
        out.append((seq_ids.tolist(), seq_labels.tolist(), r))
    return out, stats


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def cached_tokenize(
    rows: list[Any], fmt: str, tokenizer: Any, settings: Any, tokenize: Any, rebuild: Any, strict: bool = False
):
    """``tokenize(rows, fmt, tokenizer, settings)`` (data.pipeline.tokenize_rows), through the cache. A hit is handed to
    ``rebuild(items, stats)`` (items: (input_ids, labels, row index) per example; stats: DataStats' fields), which
    returns what ``tokenize`` would have: the data layer's own types, so this module imports nothing of it.

    A cache folder that cannot be written is a warning and the run goes on uncached (the cache only saves
    time), unless ``strict`` (``qlora preprocess``, whose job is to fill it), where it is a ``DataError``.
    """
    chat = rows[0].chat.key() if rows and rows[0].chat is not None else None
    key = cache_key(rows, fmt, tokenizer, settings.sequence_len, settings.train_on_inputs, chat)
    try:
        hit = load(key, len(rows))
    except Corrupt as e:
        warn(f"tokenization cache entry {entry_path(key)} is damaged ({e}); rebuilding it")
        hit = None
    if hit is not None:
        try:
            examples, stats = rebuild(*hit)
            return examples, stats, True
        except (TypeError, ValueError, KeyError) as e:  # stats that no longer fit DataStats: rebuild the entry
            warn(f"tokenization cache entry {entry_path(key)} does not fit this version of qlora ({e}); rebuilding it")
    examples, stats = tokenize(rows, fmt, tokenizer, settings)
    position = {id(row): i for i, row in enumerate(rows)}
    row_index = [position[id(ex.row)] for ex in examples]
    try:
        save(key, examples, row_index, len(rows), stats)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        message = f"cannot write the tokenization cache ({where}{e.strerror or e})"
        if strict:
            raise DataError(f"{message}; set QLORA_CACHE to a writable folder") from None
        warn(f"{message}; continuing without it (set QLORA_CACHE to a writable folder)")
    return examples, stats, False
