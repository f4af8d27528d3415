"""``qlora preprocess``: tokenize a config's datasets into the tokenization cache ahead of a run."""

from __future__ import annotations

from typing import Any

from qlora_cli.data.cache import tokenized_dir


def run_preprocess(cfg: Any, log: Any) -> list[tuple[str, bool]]:
    """``qlora preprocess``: tokenize the config's datasets into the cache, as ``train`` would (same checks),
    so a later run loads them. Returns (dataset path, was already cached) per entry."""
    import time
    from dataclasses import replace

    from qlora_cli.data.pipeline import CACHE_EVENTS, build_datasets
    from qlora_cli.model.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.base)
    settings = replace(cfg.data, cache=True, cache_required=True)
    CACHE_EVENTS.clear()
    start = time.perf_counter()
    if cfg.streaming:  # each block into the cache, one at a time, as a streamed run reads them
        return _preprocess_stream(cfg, settings, tokenizer, log, start)
    data = build_datasets(settings, tokenizer)
    elapsed = time.perf_counter() - start
    events = list(CACHE_EVENTS)
    for path, hit in events:
        log(f"{path}: {'already cached' if hit else 'tokenized and cached'}")
    rows = data.train_stats.rows + data.eval_stats.rows
    log(
        f"{len(data.train)} training and {len(data.eval)} eval examples from {rows} rows in {elapsed:.1f}s; "
        f"cache: {tokenized_dir()}"
    )
    return events


def _preprocess_stream(cfg: Any, settings: Any, tokenizer: Any, log: Any, start: float) -> list[tuple[str, bool]]:
    import time

    from qlora_cli.data.pipeline import CACHE_EVENTS, build_eval_only
    from qlora_cli.data.stream import StreamData, scan

    rows = scan(cfg.datasets)
    stream = StreamData(cfg.datasets, tokenizer, settings, cfg.stream_block_rows, False, 1, 1)
    examples = 0
    for index in range(len(cfg.datasets)):
        offset, line = 0, 1
        while True:
            units, n_rows, offset, line = stream.block(index, offset, line)
            if not n_rows:
                break
            examples += len(units)
    data = build_eval_only(settings, tokenizer)
    events = list(CACHE_EVENTS)
    hits = sum(hit for _, hit in events)
    log(
        f"{examples} training examples from {rows} streamed rows in {len(events)} cache entries ({hits} already "
        f"cached), {len(data.eval)} eval examples, in {time.perf_counter() - start:.1f}s; cache: {tokenized_dir()}"
    )
    return events
