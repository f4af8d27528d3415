from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from qlora_cli.config import DatasetSpec, DataSettings
from qlora_cli.data.pipeline import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE_INDEX,
    Row,
    build_datasets,
    collate,
    epoch_batches,
    read_rows,
    tokenize_row,
    tokenize_rows,
)
from qlora_cli.errors import DataError
from qlora_cli.testing.tiny import build_char_tokenizer

from .conftest import write_jsonl

X = IGNORE_INDEX


def settings(specs, **kw) -> DataSettings:
    base = dict(datasets=specs, eval_datasets=[], val_set_size=0.0, train_on_inputs=False, sequence_len=512, seed=0)
    base.update(kw)
    return DataSettings(**base)


def enc(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def targets(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != X], skip_special_tokens=False)


def test_completion_masks_the_prompt_and_keeps_eos(tokenizer):
    ex = tokenize_row(Row("r", {"prompt": "Q: hi\nA: ", "completion": "yo"}), "completion", tokenizer, False)
    prompt = enc(tokenizer, "Q: hi\nA: ", special=True)
    assert prompt[0] == tokenizer.bos_token_id
    assert ex.input_ids == prompt + enc(tokenizer, "yo") + [tokenizer.eos_token_id]
    assert ex.labels == [X] * len(prompt) + enc(tokenizer, "yo") + [tokenizer.eos_token_id]
    assert ex.n_targets == 3


def test_train_on_inputs_labels_everything(tokenizer):
    ex = tokenize_row(Row("r", {"prompt": "ab", "completion": "c"}), "completion", tokenizer, True)
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize("inp,template", [("", ALPACA_PROMPT), ("ctx", ALPACA_PROMPT_WITH_INPUT)])
def test_alpaca_prompt_and_masking(tokenizer, inp, template):
    row = Row("r", {"instruction": "Say hi", "input": inp, "output": "hi"})
    ex = tokenize_row(row, "alpaca", tokenizer, False)
    prompt = template.format(instruction="Say hi", input=inp)
    assert tokenizer.decode(ex.input_ids, skip_special_tokens=True) == prompt + "hi"
    assert targets(tokenizer, ex) == "hi</s>"


def test_text_trains_on_every_token(tokenizer):
    ex = tokenize_row(Row("r", {"text": "abc"}), "text", tokenizer, False)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tokenizer.eos_token_id


def test_chat_targets_are_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    ex = tokenize_row(Row("r", {"messages": messages}), "chat", tokenizer, False)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ex.input_ids[:-1], skip_special_tokens=False) == text
    # labelled runs: each assistant content with its end-of-turn token, then the final EOS
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != X:
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur, skip_special_tokens=False))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur, skip_special_tokens=False))
    assert runs == ["hello<|im_end|>", "ciao<|im_end|>", "</s>"]
    assert ex.input_ids[-1] == tokenizer.eos_token_id and ex.labels[-1] == tokenizer.eos_token_id


def test_chat_accepts_sharegpt_fields(tokenizer):
    row = Row("r", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    ex = tokenize_row(row, "chat", tokenizer, False)
    assert targets(tokenizer, ex) == "yo<|im_end|></s>"


def test_eos_is_a_target_when_pad_is_eos():
    tok = build_char_tokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    a = tokenize_row(Row("r", {"prompt": "ab", "completion": "c"}), "completion", tok, False)
    b = tokenize_row(Row("r", {"prompt": "abcdef", "completion": "ghij"}), "completion", tok, False)
    batch = collate([a, b], tok.pad_token_id)
    row_a = batch["labels"][0].tolist()
    assert row_a[: len(a.labels)] == a.labels and row_a[len(a.labels) - 1] == tok.eos_token_id
    assert row_a[len(a.labels) :] == [X] * (len(b.labels) - len(a.labels))
    assert batch["attention_mask"][0].tolist() == [1] * len(a.input_ids) + [0] * (len(b.input_ids) - len(a.input_ids))


def test_truncation_is_counted_and_empty_targets_dropped(tokenizer):
    rows = [
        Row("a", {"prompt": "p" * 3, "completion": "c" * 10}),  # 1 + 3 + 11 = 15 tokens
        Row("b", {"prompt": "p" * 20, "completion": "c"}),  # prompt alone exceeds 8
        Row("c", {"prompt": "p", "completion": "c"}),
    ]
    examples, stats = tokenize_rows(rows, "completion", tokenizer, settings([], sequence_len=8))
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert [len(e.input_ids) for e in examples] == [8, 4]
    assert stats.target_tokens == 4 + 2


def write_files(tmp_path, rows):
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
    }
    paths["json"].write_text(json.dumps(rows))
    table = pa.Table.from_pylist(rows)
    pacsv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"])
    return paths


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path, ext):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    got = read_rows(DatasetSpec(path=str(write_files(tmp_path, rows)[ext])))
    assert [r.fields for r in got] == rows


def data_error(spec_path, type_="completion", tok=None) -> str:
    tok = tok or build_char_tokenizer()
    with pytest.raises(DataError) as e:
        build_datasets(settings([DatasetSpec(path=str(spec_path), type=type_)]), tok)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", \n')
    assert f"{p}:3: malformed JSON" in data_error(p)


def test_missing_field_names_file_line_and_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    msg = data_error(p)
    assert f"{p}:2" in msg and "missing field 'completion'" in msg


def test_non_string_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": 3}])
    assert "field 'completion' must be a string" in data_error(p)


def test_file_errors(tmp_path):
    assert "dataset file not found" in data_error(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    assert "unsupported dataset file extension '.txt'" in data_error(tmp_path / "d.txt")
    (tmp_path / "e.jsonl").write_text("\n")
    assert "has no rows" in data_error(tmp_path / "e.jsonl")


def test_everything_truncated_away(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 50, "completion": "c"}])
    with pytest.raises(DataError, match="no training examples left"):
        build_datasets(settings([DatasetSpec(path=str(p))], sequence_len=10), tokenizer)


def test_chat_without_template(tmp_path):
    tok = build_char_tokenizer(chat_template=None)
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    assert "no chat template" in data_error(p, "chat", tok)


def test_val_set_size_splits_without_overlap(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    data = build_datasets(settings([DatasetSpec(path=str(p))], val_set_size=0.25), tokenizer)
    assert (len(data.train), len(data.eval)) == (15, 5)
    train_ids = {tuple(e.input_ids) for e in data.train}
    assert not train_ids & {tuple(e.input_ids) for e in data.eval}
    assert data.train_stats.tokens == sum(len(e.input_ids) for e in data.train)


def test_epoch_order_is_a_reproducible_permutation():
    a, b = epoch_batches(10, 3, seed=1, epoch=0), epoch_batches(10, 3, seed=1, epoch=0)
    assert a == b and sorted(i for batch in a for i in batch) == list(range(10))
    assert epoch_batches(10, 3, seed=1, epoch=1) != a
    assert [len(x) for x in a] == [3, 3, 3, 1]
