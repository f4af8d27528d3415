"""``streaming: true``: the training files read a block at a time, every row once per epoch, resumed at the same
example, packed, cached per block, and never read whole."""

from __future__ import annotations

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from qlora_cli.data import pipeline, sources
from qlora_cli.layout import ADAPTER_WEIGHTS
from qlora_cli.train import loop
from qlora_cli.train.loop import run_train
from tests.conftest import interrupted_then_resumed, make_config, upper_rows, write_jsonl
from tests.test_cli import assert_user_error, run_cli

QUIET = Console(quiet=True)


def _cfg(tmp_path, data, out, **kw):
    kw = {"streaming": True, "stream_block_rows": 12, "micro_batch_size": 4, "max_steps": 8, "save_steps": 3,
          "learning_rate": 5e-3, **kw}  # fmt: skip
    return make_config(tmp_path / "base", data, tmp_path / out, **kw)


@pytest.fixture
def base(tmp_path, llama_dir):
    (tmp_path / "base").symlink_to(llama_dir)  # _cfg's base
    return tmp_path / "base"


def _no_whole_reads(monkeypatch, data):
    real = sources.read_rows

    def guarded(spec):
        assert spec.path != str(data), "the streamed file was read whole"
        return real(spec)

    monkeypatch.setattr(sources, "read_rows", guarded)
    monkeypatch.setattr(pipeline, "read_rows", guarded)


def test_a_stream_trains_every_row_once_per_epoch_a_block_at_a_time(tmp_path, base, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(30, 0))  # 30 rows: blocks of 12, 12 and 6
    _no_whole_reads(monkeypatch, data)
    seen, blocks = [], []
    real_step, real_block = loop.train_step, pipeline.tokenize_block

    def record(run, window):
        seen.extend(e.row.where for batch in window for row in batch for e in row)
        return real_step(run, window)

    def block(spec, rows, tokenizer, settings):
        blocks.append(len(rows))
        return real_block(spec, rows, tokenizer, settings)

    monkeypatch.setattr(loop, "train_step", record)
    monkeypatch.setattr(pipeline, "tokenize_block", block)
    result = run_train(_cfg(tmp_path, data, "run", max_steps=11, dataset_cache=False), console=QUIET)
    assert max(blocks) == 12  # never more than a block of rows in memory
    first_epoch = seen[:30]
    assert sorted(first_epoch) == sorted(f"{data}:{i}" for i in range(1, 31))  # every row once
    assert [int(w.rsplit(":", 1)[1]) <= 12 for w in first_epoch[:12]] == [True] * 12  # the first block first
    assert first_epoch[:12] != sorted(first_epoch[:12], key=lambda w: int(w.rsplit(":", 1)[1]))  # shuffled within it
    assert len(seen) == 42 and seen[30:] != first_epoch[:12]  # 8 steps an epoch (the last block 6 rows); reshuffled
    assert result.steps == 11


def test_a_streamed_run_resumes_at_the_same_example_bit_exact(tmp_path, base, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(30, 0))
    straight = tmp_path / "straight"
    run_train(_cfg(tmp_path, data, "straight"), console=QUIET)
    resumed = _cfg(tmp_path, data, "resumed")
    interrupted_then_resumed(resumed, monkeypatch, QUIET, at=5)  # checkpoint at step 3: mid-block (3 steps/block)
    a, b = load_file(str(straight / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "resumed" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_packs_within_blocks_and_caches_each_block(tmp_path, base, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(30, 0))
    lengths = []
    real_step = loop.train_step

    def record(run, window):
        lengths.extend(sum(len(e.input_ids) for e in row) for batch in window for row in batch)
        return real_step(run, window)

    monkeypatch.setattr(loop, "train_step", record)
    pipeline.CACHE_EVENTS.clear()
    run_train(_cfg(tmp_path, data, "a", sample_packing=True, sequence_len=64, max_steps=2), console=QUIET)
    assert lengths and max(lengths) <= 64 and max(lengths) > 40  # packs, not single examples
    assert [hit for _, hit in pipeline.CACHE_EVENTS] == [False, False]  # packed, a block is a step: 2 blocks, once each
    pipeline.CACHE_EVENTS.clear()
    run_train(_cfg(tmp_path, data, "b", sample_packing=True, sequence_len=64, max_steps=2), console=QUIET)
    assert pipeline.CACHE_EVENTS and all(hit for _, hit in pipeline.CACHE_EVENTS)  # every block from its shard


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_steps": None}, "key 'streaming': needs max_steps"),
        ({"val_set_size": 0.1}, "key 'val_set_size': not with streaming"),
        ({"datasets": [{"path": "d.json"}]}, "key 'streaming': reads local .jsonl files; d.json is not one"),
    ],
)
def test_bad_streaming_settings_are_one_line_errors(tmp_path, llama_dir, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, 0))
    config = {"base_model": str(llama_dir), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o"),
              "device": "cpu", "streaming": True, "max_steps": 2, **extra}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    assert_user_error(run_cli("train", str(tmp_path / "c.yaml")), message)
    assert not (tmp_path / "o").exists()


def test_a_malformed_line_deep_in_a_stream_names_its_file_and_line(tmp_path, llama_dir):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, upper_rows(30, 0))
    data.write_text(data.read_text() + "{not json\n")
    config = {"base_model": str(llama_dir), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o"),
              "device": "cpu", "streaming": True, "max_steps": 20, "stream_block_rows": 12,
              "bnb_4bit_compute_dtype": "float32"}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert_user_error(run_cli("train", str(tmp_path / "c.yaml")), f"{data}:31: malformed JSON")


def test_preprocess_fills_the_cache_block_by_block_and_inspect_reads_the_first_block(tmp_path, llama_dir, monkeypatch):
    import json

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(30, 0))
    _no_whole_reads(monkeypatch, data)
    config = {"base_model": str(llama_dir), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o"),
              "device": "cpu", "streaming": True, "max_steps": 9, "stream_block_rows": 12, "micro_batch_size": 4,
              "bnb_4bit_compute_dtype": "float32"}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    res = run_cli("preprocess", str(tmp_path / "c.yaml"))
    assert res.exit_code == 0, res.output
    assert "30 training examples from 30 streamed rows in 3 cache entries (0 already cached)" in res.output
    pipeline.CACHE_EVENTS.clear()
    res = run_cli("train", str(tmp_path / "c.yaml"))
    assert res.exit_code == 0, res.output
    assert len(pipeline.CACHE_EVENTS) >= 3 and all(hit for _, hit in pipeline.CACHE_EVENTS)
    res = run_cli("inspect", "data", str(tmp_path / "c.yaml"), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["train"]["rows"] == 12 and any("first 12 rows" in w for w in report["warnings"])
