"""Dataset entries as datasets.load_dataset takes them: subsets, data_files, split, revision, max_samples.

The hub cannot be reached here, so the same code path is driven with local dataset folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_cli.config import DatasetSpec
from qlora_cli.data.sources import load_dataset_kwargs, read_rows
from qlora_cli.errors import DataError

from .conftest import upper_rows, write_jsonl
from .test_cli import assert_user_error, run_cli, write_config


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def subset_folder(root: Path) -> Path:
    """A dataset folder with two subsets (README configs), as hub datasets are laid out."""
    folder = root / "ds"
    for sub in ("first", "second"):
        (folder / sub).mkdir(parents=True)
    write_jsonl(folder / "first" / "train.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)])
    write_jsonl(folder / "first" / "test.jsonl", [{"prompt": "tp", "completion": "tc"}])
    write_jsonl(folder / "second" / "train.jsonl", [{"text": f"t{i}"} for i in range(3)])
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: first\n  data_files:\n  - split: train\n    path: first/train.jsonl\n"
        "  - split: test\n    path: first/test.jsonl\n"
        "- config_name: second\n  data_files:\n  - split: train\n    path: second/train.jsonl\n---\n"
    )
    return folder


def test_only_the_keys_set_reach_load_dataset():
    assert load_dataset_kwargs(DatasetSpec(path="org/ds")) == {"split": "train"}
    spec = DatasetSpec(path="org/ds", name="sub", data_files={"train": "a.jsonl"}, split="test", revision="v1")
    assert load_dataset_kwargs(spec) == {
        "split": "test", "name": "sub", "data_files": {"train": "a.jsonl"}, "revision": "v1"
    }  # fmt: skip


def test_subset_split_data_files_and_max_samples_of_a_folder(tmp_path):
    folder = subset_folder(tmp_path)
    first = read_rows(DatasetSpec(path=str(folder), name="first"))
    assert [r.fields["prompt"] for r in first] == [f"p{i}" for i in range(5)]
    second = read_rows(DatasetSpec(path=str(folder), name="second", type="text"))
    assert [r.fields["text"] for r in second] == ["t0", "t1", "t2"]
    test = read_rows(DatasetSpec(path=str(folder), name="first", split="test"))
    assert [r.fields["prompt"] for r in test] == ["tp"]
    files = read_rows(DatasetSpec(path=str(folder), data_files={"train": "second/train.jsonl"}, type="text"))
    assert len(files) == 3
    assert [r.fields["prompt"] for r in read_rows(DatasetSpec(path=str(folder), name="first", max_samples=2))] == [
        "p0",
        "p1",
    ]
    with pytest.raises(DataError, match="nope"):
        read_rows(DatasetSpec(path=str(folder), name="nope"))


def test_save_to_disk_folder_and_max_samples_of_a_file(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    got = read_rows(DatasetSpec(path=str(tmp_path / "saved"), max_samples=3))
    assert [r.fields["prompt"] for r in got] == ["p0", "p1", "p2"]
    with pytest.raises(DataError, match="no split 'test'"):
        read_rows(DatasetSpec(path=str(tmp_path / "saved"), split="test"))
    with pytest.raises(DataError, match="no subsets"):
        read_rows(DatasetSpec(path=str(tmp_path / "saved"), name="x"))
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(read_rows(DatasetSpec(path=str(data), max_samples=2))) == 2
    with pytest.raises(DataError, match="name apply to hub datasets"):
        read_rows(DatasetSpec(path=str(data), name="x"))


def test_mixed_datasets_each_with_its_type_and_a_missing_subset_is_one_line(tmp_path, llama_dir):
    from qlora_cli.config import load_config
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.model.loading import load_tokenizer

    folder = subset_folder(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(4, seed=1))
    entries = [
        {"path": str(folder), "name": "first", "type": "completion", "max_samples": 2},
        {"path": str(folder), "name": "second", "type": "text"},
        {"path": str(data), "type": "completion"},
    ]
    cfg = load_config(write_config(tmp_path, llama_dir, data, datasets=entries))
    built = build_datasets(cfg.data, load_tokenizer(cfg.base))
    assert [e.fmt for e in built.train] == ["completion"] * 2 + ["text"] * 3 + ["completion"] * 4
    assert built.train_stats.rows == 9
    bad = write_config(tmp_path, llama_dir, data, datasets=[{"path": str(folder), "name": "nope"}])
    assert_user_error(run_cli("train", str(bad)), "nope", tmp_path / "run")
