"""The tokenization cache: a second run loads, any change to an input misses, a damaged entry is rebuilt."""

from __future__ import annotations

import json
import os

import pytest

import qlora_cli.data.pipeline as data_mod
from qlora_cli.config import DatasetSpec, DataSettings
from qlora_cli.data.cache import entry_path, tokenized_dir
from qlora_cli.data.pipeline import build_datasets, tokenize_many
from qlora_cli.errors import DataError
from qlora_cli.testing.tiny import build_char_tokenizer

from .conftest import upper_rows, write_jsonl


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))


def settings(specs, **kw) -> DataSettings:
    base = dict(
        datasets=specs, eval_datasets=[], val_set_size=0.0, train_on_inputs=False, sequence_len=512, seed=0, cache=True
    )
    base.update(kw)
    return DataSettings(**base)


class Spy:
    """Counts calls of data.tokenize_rows (what the cache stands in for)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = data_mod.tokenize_rows

        def spy(*args, **kw):
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(data_mod, "tokenize_rows", spy)


def tokens(built):
    return [(e.input_ids, e.labels, e.row.where, e.fmt) for e in built.train]


def test_second_run_loads_the_same_tokens_without_tokenizing(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    tok = build_char_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(12, seed=1))
    s = settings([DatasetSpec(path=str(data))], sequence_len=22)  # some truncated, some dropped
    first = build_datasets(s, tok)
    assert spy.calls == 1 and len(list(tokenized_dir().iterdir())) == 1
    assert first.train_stats.truncated > first.train_stats.dropped > 0 and first.train
    second = build_datasets(s, tok)
    assert spy.calls == 1  # loaded, not tokenized
    assert tokens(second) == tokens(first) and second.train_stats == first.train_stats
    fresh = build_datasets(settings([DatasetSpec(path=str(data))], sequence_len=22, cache=False), tok)
    assert tokens(second) == tokens(fresh)


def test_each_input_change_misses(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(6, seed=1))
    chat = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}]} for w in "abc"],
    )
    spec = DatasetSpec(path=str(data))
    tok = build_char_tokenizer()
    variants = [
        (settings([spec]), tok),
        (settings([spec], sequence_len=100), tok),
        (settings([spec], train_on_inputs=True), tok),
        (settings([spec]), build_char_tokenizer(add_bos=False)),
        (settings([spec]), build_char_tokenizer(pad_is_eos=True)),
        (settings([DatasetSpec(path=str(data), max_samples=5)]), tok),
        (settings([DatasetSpec(path=str(chat), type="chat")]), tok),
        (settings([DatasetSpec(path=str(chat), type="chat")]), build_char_tokenizer(chat_template=CHAT_B)),
    ]
    for n, (s, t) in enumerate(variants, start=1):
        build_datasets(s, t)
        assert spy.calls == n, f"variant {n} hit the cache"
    for s, t in variants:  # and every one of them is cached now
        build_datasets(s, t)
    assert spy.calls == len(variants)
    write_jsonl(data, upper_rows(6, seed=2))  # the file's content changes
    build_datasets(settings([spec]), tok)
    assert spy.calls == len(variants) + 1


CHAT_B = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def edit_stats(entry, edit) -> None:
    """Rewrite the entry with its ``stats`` metadata changed by ``edit`` (a consistent safetensors file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(entry), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(entry), metadata={**meta, "stats": edit(meta["stats"])})


STATS_EDITS = {
    "stats-numbers": lambda text: json.dumps({k: 12345 for k in json.loads(text)}),  # silently wrong counts
    "stats-keys": lambda text: json.dumps({"bogus": 1}),  # was a TypeError traceback in DataStats(**stats)
    "stats-list": lambda text: "[1, 2]",
}


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", *STATS_EDITS])
def test_a_damaged_entry_is_rebuilt_never_trusted(tmp_path, monkeypatch, capsys, damage):
    spy = Spy(monkeypatch)
    tok = build_char_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    s = settings([DatasetSpec(path=str(data))])
    first = build_datasets(s, tok)
    (entry,) = tokenized_dir().iterdir()
    raw = bytearray(entry.read_bytes())
    if damage in STATS_EDITS:
        edit_stats(entry, STATS_EDITS[damage])
        raw = bytearray(entry.read_bytes())
    elif damage == "truncate":
        raw = raw[: len(raw) - 9]
    elif damage == "flip":
        raw[-5] ^= 0x01  # a token id in the data section, header intact
    else:
        raw = bytearray(b"not a safetensors file")
    entry.write_bytes(bytes(raw))
    again = build_datasets(s, tok)
    assert spy.calls == 2 and "damaged" in capsys.readouterr().err
    assert tokens(again) == tokens(first) and again.train_stats == first.train_stats
    build_datasets(s, tok)  # the rebuilt entry is good
    assert spy.calls == 2


def test_read_only_cache_warns_and_trains_but_preprocess_refuses(tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0:  # root writes anywhere: make the cache path a file instead
        (tmp_path / "cache").write_text("")
    else:
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache").chmod(0o500)
    tok = build_char_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(4, seed=1))
    built = build_datasets(settings([DatasetSpec(path=str(data))]), tok)
    assert len(built.train) == 4 and "cannot write the tokenization cache" in capsys.readouterr().err
    with pytest.raises(DataError, match="cannot write the tokenization cache"):
        build_datasets(settings([DatasetSpec(path=str(data))], cache_required=True), tok)


def test_processes_and_batches_give_the_tokens_of_one_row_at_a_time(monkeypatch):
    monkeypatch.setattr(data_mod, "PARALLEL_MIN_ROWS", 8)
    tok = build_char_tokenizer()
    rows = [data_mod.Row(f"r{i}", r) for i, r in enumerate(upper_rows(40, seed=3))]
    for fmt, some in [
        ("completion", rows),
        ("text", [data_mod.Row(r.where, {"text": r.fields["prompt"]}) for r in rows]),
        ("chat", [data_mod.Row(r.where, {"messages": [{"role": "user", "content": r.fields["prompt"]},
                                                     {"role": "assistant", "content": r.fields["completion"]}]})
                  for r in rows]),
    ]:  # fmt: skip
        one = [(e.input_ids, e.labels) for e in (data_mod.tokenize_row(r, fmt, tok, False) for r in some)]
        for num_proc in (1, 2):  # chat with 2: forked workers; completion/text: batches
            assert [(e.input_ids, e.labels) for e in tokenize_many(some, fmt, tok, False, num_proc)] == one
    bad = some[:20] + [data_mod.Row("bad:1", {"messages": []})] + some[20:]  # some: the chat rows
    with pytest.raises(DataError, match="bad:1: field 'messages' must be a non-empty list"):
        tokenize_many(bad, "chat", tok, False, num_proc=2)


def test_entry_path_is_under_qlora_cache(tmp_path):
    assert entry_path("ab" * 32).parent == tmp_path / "cache" / "tokenized"


def test_preprocess_fills_the_cache_and_train_then_does_not_tokenize(tmp_path, llama_dir, monkeypatch):
    from .test_cli import assert_user_error, run_cli, write_config

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    cfg = write_config(tmp_path, llama_dir, data)
    result = run_cli("preprocess", str(cfg))
    assert result.exit_code == 0, result.output
    assert "tokenized and cached" in result.stderr and not (tmp_path / "run").exists()
    assert "already cached" in run_cli("preprocess", str(cfg)).stderr
    spy = Spy(monkeypatch)
    result = run_cli("train", str(cfg))
    assert result.exit_code == 0, result.output
    assert spy.calls == 0  # training started from the cache
    assert_user_error(run_cli("train", str(cfg), "--set", "dataset_num_proc=0"), "dataset_num_proc")
    monkeypatch.setenv("QLORA_CACHE", str(data))  # a file: nothing can be written under it
    assert_user_error(run_cli("preprocess", str(cfg)), "cannot write the tokenization cache")
