"""`qlora train` never overwrites what it did not write: --resume with nothing to resume, --force on a folder
that is not a run folder, and --force over a run folder that leaves nothing of the old run behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from .conftest import upper_rows, write_jsonl
from .test_cli import assert_user_error, run_cli, write_config


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256): what "nothing changed" means."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))


def test_resume_of_a_finished_run_without_checkpoints_leaves_it_as_it_is(tmp_path, llama_dir, data):
    cfg = write_config(tmp_path, llama_dir, data)  # no save_steps: the finished run has no checkpoint
    assert run_cli("train", str(cfg)).exit_code == 0
    run = tmp_path / "run"
    before = snapshot(run)
    assert "adapter_model.safetensors" in before
    result = run_cli("train", str(cfg), "--resume", "--set", "learning_rate=0.5")
    assert_user_error(result, "is a run that finished at step 2 and has no checkpoint to resume from")
    assert snapshot(run) == before


def test_resume_of_an_unfinished_run_without_checkpoints_is_refused(tmp_path, llama_dir, data):
    cfg = write_config(tmp_path, llama_dir, data)
    assert run_cli("train", str(cfg)).exit_code == 0
    run = tmp_path / "run"
    records = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(r for r in records if '"summary"' not in r) + "\n")
    before = snapshot(run)
    assert_user_error(run_cli("train", str(cfg), "--resume"), "has no complete checkpoint to resume from")
    assert snapshot(run) == before


@pytest.mark.parametrize("flag", ["--resume", "--force"])
def test_a_folder_that_is_not_a_run_is_never_written(tmp_path, llama_dir, data, flag):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    (mine / "tokenizer.json").write_text("{}\n")
    (mine / "qlora_config.yaml").write_text("a config of mine, kept here\n")  # one name alike is not a run
    before = snapshot(mine)
    cfg = write_config(tmp_path, llama_dir, data, output_dir=str(mine))
    assert_user_error(run_cli("train", str(cfg), flag), "is not a qlora run folder")
    assert snapshot(mine) == before


@pytest.mark.parametrize("flag", ["--resume", "--force"])
def test_output_dir_slash_is_refused(tmp_path, llama_dir, data, flag):
    cfg = write_config(tmp_path, llama_dir, data, output_dir="/")
    assert_user_error(run_cli("train", str(cfg), flag), "output_dir / ")
    assert not Path("/qlora_config.yaml").exists() and not Path("/adapter_model.safetensors").exists()


def test_resume_with_nothing_there_yet_starts_a_new_run(tmp_path, llama_dir, data):
    """A job script that always passes --resume: the first launch has nothing to lose and starts the run."""
    cfg = write_config(tmp_path, llama_dir, data)
    result = run_cli("train", str(cfg), "--resume")
    assert result.exit_code == 0, result.output
    assert "nothing to resume" in result.stderr and "starting a new run" in result.stderr
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_another_runs_checkpoint_is_not_resumed_into_a_run(tmp_path, llama_dir, data):
    """resume_from_checkpoint naming run a's checkpoint with output_dir a finished run b replaced b's adapter and
    mixed a's continuation into b's log."""
    a = write_config(tmp_path, llama_dir, data, save_steps=1, output_dir=str(tmp_path / "a"))
    assert run_cli("train", str(a)).exit_code == 0
    b = write_config(tmp_path, llama_dir, data, output_dir=str(tmp_path / "b"))
    assert run_cli("train", str(b)).exit_code == 0
    before = snapshot(tmp_path / "b")
    step = tmp_path / "a" / "checkpoints" / "step-1"
    result = run_cli("train", str(b), "--set", f"resume_from_checkpoint={step}")
    assert_user_error(result, "is not a checkpoint of the run in output_dir")
    assert snapshot(tmp_path / "b") == before
    # into a new, empty folder it continues run a
    result = run_cli(
        "train", str(b), "--set", f"resume_from_checkpoint={step}", "--set", f"output_dir={tmp_path / 'c'}"
    )
    assert result.exit_code == 0 and "resuming from" in result.stderr, result.output


def test_force_replaces_a_run_and_leaves_no_old_checkpoint_or_best(tmp_path, llama_dir, data):
    """The old run's checkpoints would otherwise be resumed as the new run's (same config, higher step), and its
    best/ shipped as the new run's best adapter."""
    old = write_config(
        tmp_path, llama_dir, data, max_steps=3, save_steps=1, eval_steps=1, save_best=True,
        eval_datasets=[{"path": str(data), "type": "completion"}],
    )  # fmt: skip
    assert run_cli("train", str(old)).exit_code == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-2").is_dir() and (run / "best").is_dir()
    (run / "notes.txt").write_text("kept\n")
    new = write_config(tmp_path, llama_dir, data, max_steps=1, learning_rate=1e-3)
    assert run_cli("train", str(new), "--force").exit_code == 0
    assert not (run / "checkpoints").exists() and not (run / "best").exists()
    assert (run / "notes.txt").read_text() == "kept\n"
    assert yaml.safe_load((run / "qlora_config.yaml").read_text())["max_steps"] == 1
    # nothing of the old run is left to resume
    assert_user_error(run_cli("train", str(new), "--resume"), "finished at step 1")
