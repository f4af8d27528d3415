"""Experiment trackers through accelerate: TensorBoard read back with its own reader, resume, missing packages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qlora_cli.config import load_config
from qlora_cli.errors import ConfigError
from qlora_cli.trackers import hyperparameters, tracker_values
from qlora_cli.train import train

from .conftest import make_config, upper_rows, write_jsonl
from .test_cli import assert_user_error, run_cli, write_config


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard's own reader finds under ``logdir`` (purged events already dropped)."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_numbers_of_metrics_jsonl(tmp_path, llama_dir, quiet_console):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=4))
    cfg = make_config(
        llama_dir, data, tmp_path / "run", max_steps=4, micro_batch_size=4, eval_steps=2,
        eval_datasets=[{"path": str(data)}], report_to=["tensorboard"], run_name="tb-test",
    )  # fmt: skip
    out = train(cfg, console=quiet_console).output_dir
    found = scalars(out / "tensorboard")
    train_recs, eval_recs = records(out, "train"), records(out, "eval")
    assert [s for s, _ in found["train/loss"]] == [1, 2, 3, 4]
    for key, tag in (("loss", "train/loss"), ("lr", "train/learning_rate"), ("grad_norm", "train/grad_norm")):
        assert [v for _, v in found[tag]] == pytest.approx([r[key] for r in train_recs], rel=1e-6), tag
    assert [v for _, v in found["eval/loss"]] == pytest.approx([r["eval_loss"] for r in eval_recs], rel=1e-6)
    assert [s for s, _ in found["eval/loss"]] == [r["step"] for r in eval_recs] == [2, 4]
    hparams = list((out / "tensorboard").glob("*/hparams.yml"))  # accelerate stores the config beside the events
    assert len(hparams) == 1 and "lora_r: 16" in hparams[0].read_text()


def test_resumed_run_continues_the_curve_without_repeated_steps(tmp_path, llama_dir, quiet_console):
    """Train 4 steps with a checkpoint at 2, then resume from it to step 6 (steps 3 and 4 are trained again,
    under the new schedule): TensorBoard shows steps 1..6 once each, with the resumed run's values."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=4))
    cfg = make_config(
        llama_dir, data, tmp_path / "run", max_steps=4, micro_batch_size=4, save_steps=2, report_to="tensorboard"
    )
    out = train(cfg, console=quiet_console).output_dir
    first = dict(scalars(out / "tensorboard")["train/loss"])
    train(cfg.model_copy(update={"max_steps": 6, "resume_from_checkpoint": "auto"}), console=quiet_console)
    found = scalars(out / "tensorboard")["train/loss"]
    assert [s for s, _ in found] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in found] == pytest.approx([r["loss"] for r in records(out, "train")], rel=1e-6)
    # the event files hold step 4 twice (the first run's and the resumed one's); the reader keeps one
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    raw = [
        e.step
        for f in sorted((out / "tensorboard").glob("events.out.tfevents.*"))
        for e in EventFileLoader(str(f)).Load()
        if any(v.tag == "train/loss" for v in e.summary.value)
    ]
    assert sorted(raw) == [1, 2, 3, 3, 4, 4, 5, 6] and 4 in first


def test_a_tracker_that_is_not_installed_is_a_user_error(tmp_path, llama_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    cfg = write_config(tmp_path, llama_dir, data, report_to=["tensorboard", "wandb"])
    assert_user_error(run_cli("train", str(cfg)), "report_to: wandb needs the wandb package; pip install wandb")
    assert not (tmp_path / "run").exists()


def test_report_to_forms_and_hyperparameters(tmp_path):
    base = {"base_model": "org/m", "datasets": [{"path": "d.jsonl"}]}
    assert load_config(None, **base).report_to == []
    assert load_config(None, **base, report_to="none").report_to == []
    assert load_config(None, **base, report_to="mlflow").report_to == ["mlflow"]
    assert load_config(None, **base, report_to=["wandb", "wandb"]).report_to == ["wandb"]
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, **base, report_to=["comet"])
    hp = hyperparameters(load_config(None, **base, lora_r=8))
    assert hp["lora_r"] == 8 and hp["tokenizer"] == "null" and json.loads(hp["datasets"])[0]["path"] == "d.jsonl"
    assert tracker_values({"type": "eval", "step": 3, "eval_loss": 1.5, "eval_ppl": 4.48}) == {
        "eval/loss": 1.5,
        "eval/perplexity": 4.48,
    }
    assert tracker_values({"type": "summary", "steps": 3}) == {}
