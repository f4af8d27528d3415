"""Experiment trackers through accelerate, each read back with its own reader (TensorBoard's EventAccumulator,
W&B's offline transaction log through `wandb leet inspect`, MLflow's client on a file store), across a resume;
missing packages; the config keys. Nothing here touches the network: W&B runs offline, MLflow's store is a folder."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_cli.config import load_config
from qlora_cli.errors import ConfigError
from qlora_cli.train.loop import run_train
from qlora_cli.train.trackers import hyperparameters, tracker_values

from .conftest import make_config, upper_rows, write_jsonl
from .test_cli import assert_user_error, run_cli, write_config

# accelerate 1.2 starts a tracker when it is built, newer ones in init_trackers: these also run on the oldest
pytestmark = pytest.mark.oldest


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
    out = run_train(cfg, console=quiet_console).output_dir
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
    out = run_train(cfg, console=quiet_console).output_dir
    first = dict(scalars(out / "tensorboard")["train/loss"])
    run_train(cfg.model_copy(update={"max_steps": 6, "resume_from_checkpoint": "auto"}), console=quiet_console)
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


def test_a_tracker_that_does_not_start_is_a_user_error(tmp_path, llama_dir, monkeypatch):
    """MLflow refuses a tracking URI it has no store for: after the start summary, one error line naming the
    exception, exit 2, no traceback, and the new run folder is gone again."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    cfg = write_config(tmp_path, llama_dir, data, report_to=["tensorboard", "mlflow"])
    result = run_cli("train", str(cfg))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: report_to: a tracker did not start: mlflow.") and "bogus://nowhere" in errors[0]
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


# -- Weights & Biases, offline ---------------------------------------------------------------------------------


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, silent, without error reporting, its settings and caches under tmp_path; torn down after."""
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false"}
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[name] = str(tmp_path / "wandb-home" / name.lower())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    yield
    wandb.teardown()  # W&B's service process and its settings, read from the environment, go with the test


def wandb_sessions(out: Path) -> list[list[dict]]:
    """The records of each offline W&B session under ``out/wandb``, oldest first, as W&B's own reader of the
    transaction log gives them (`wandb leet inspect --json`: one JSON record a line)."""

    def started(run_dir: Path) -> tuple[str, int]:  # offline-run-DATE_TIME-ID, with -N when the second repeats
        m = re.fullmatch(r"offline-run-(\d{8}_\d{6})-[^-]+(?:-(\d+))?", run_dir.name)
        assert m, run_dir.name
        return m[1], int(m[2] or 0)

    sessions = []
    for run_dir in sorted((out / "wandb").glob("offline-run-*"), key=started):
        (log,) = run_dir.glob("run-*.wandb")
        cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=os.environ)
        assert done.returncode == 0, done.stderr
        sessions.append([json.loads(line) for line in done.stdout.splitlines() if line.strip()])
    return sessions


def wandb_history(session: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in one session's history records."""
    rows = [r["history"] for r in session if r["type"] == "history"]
    return [(row["step"]["num"], row["item"][key]) for row in rows if key in row["item"]]


def the_run(session: list[dict]) -> dict:
    (run,) = [r["run"] for r in session if r["type"] == "run"]
    return run


def test_wandb_offline_run_holds_the_numbers_of_metrics_jsonl(tmp_path, llama_dir, quiet_console, wandb_offline):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=4))
    cfg = make_config(
        llama_dir, data, tmp_path / "run", max_steps=4, micro_batch_size=4, eval_steps=2,
        eval_datasets=[{"path": str(data)}], report_to=["wandb"], run_name="wb-test",
        wandb_project="qlora-tests", wandb_entity="qlora-team",
    )  # fmt: skip
    out = run_train(cfg, console=quiet_console).output_dir
    (session,) = wandb_sessions(out)  # offline: the run lies under the run folder
    train_recs, eval_recs = records(out, "train"), records(out, "eval")
    for key, name in (("loss", "train/loss"), ("lr", "train/learning_rate"), ("grad_norm", "train/grad_norm")):
        found = wandb_history(session, name)
        assert [s for s, _ in found] == [r["step"] for r in train_recs] == [1, 2, 3, 4], name
        assert [v for _, v in found] == pytest.approx([r[key] for r in train_recs], rel=1e-9), name
    found = wandb_history(session, "eval/loss")
    assert found == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-9)) for r in eval_recs]
    assert [s for s, _ in found] == [2, 4]
    run = the_run(session)
    ids = json.loads((out / "trackers.json").read_text())
    assert (run["project"], run["entity"], run["display_name"]) == ("qlora-tests", "qlora-team", "wb-test")
    assert run["run_id"] == ids["wandb_id"]
    (config,) = [r["config"]["update"] for r in session if r["type"] == "config"]  # the hyperparameters
    assert config["lora_r"] == 16 and config["wandb_project"] == "qlora-tests" and config["max_steps"] == 4


def test_wandb_resume_continues_the_run_without_repeated_steps(
    tmp_path, llama_dir, quiet_console, wandb_offline, monkeypatch
):
    """Train 4 steps with a checkpoint at 2, resume to step 6: the second offline session is the same run
    (same id), and it sends only steps 5 and 6 (W&B cannot take a step back; steps 3 and 4 keep the first
    session's values). WANDB_PROJECT and WANDB_ENTITY give the project and entity when the keys are unset."""
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=4))
    cfg = make_config(
        llama_dir, data, tmp_path / "run", max_steps=4, micro_batch_size=4, save_steps=2, eval_steps=2,
        eval_datasets=[{"path": str(data)}], report_to="wandb",
    )  # fmt: skip
    out = run_train(cfg, console=quiet_console).output_dir
    first = {r["step"]: r for r in records(out, "train")}
    run_train(cfg.model_copy(update={"max_steps": 6, "resume_from_checkpoint": "auto"}), console=quiet_console)
    sessions = wandb_sessions(out)
    assert len(sessions) == 2
    runs = [the_run(s) for s in sessions]
    assert runs[0]["run_id"] == runs[1]["run_id"] == json.loads((out / "trackers.json").read_text())["wandb_id"]
    assert [(r["project"], r["entity"]) for r in runs] == [("from-env", "env-team")] * 2
    assert [r["display_name"] for r in runs] == ["run", "run"]  # the output_dir's name
    assert [s for s, _ in wandb_history(sessions[0], "train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in wandb_history(sessions[1], "train/loss")] == [5, 6]
    assert [s for s, _ in wandb_history(sessions[1], "eval/loss")] == [6]
    assert not [r for r in sessions[1] if r["type"] == "config"]  # the hyperparameters are not sent again
    final = {r["step"]: r for r in records(out, "train")}
    lr = dict(wandb_history(sessions[0], "train/learning_rate")) | dict(
        wandb_history(sessions[1], "train/learning_rate")
    )
    # the resumed run's schedule (6 steps) differs from the first's (4) at steps 3 and 4: W&B keeps the first
    assert lr == pytest.approx({s: (first if s <= 4 else final)[s]["lr"] for s in range(1, 7)}, rel=1e-9)
    assert final[4]["lr"] != pytest.approx(first[4]["lr"])


# -- MLflow, file store ----------------------------------------------------------------------------------------


def test_mlflow_file_store_holds_the_numbers_and_resume_adds_no_step(tmp_path, llama_dir, quiet_console, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny)")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses its file store without it
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "qlora-tests")
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=4))
    cfg = make_config(
        llama_dir, data, tmp_path / "run", max_steps=4, micro_batch_size=4, save_steps=2, eval_steps=2,
        eval_datasets=[{"path": str(data)}], report_to=["mlflow"], run_name="ml-test",
    )  # fmt: skip
    out = run_train(cfg, console=quiet_console).output_dir
    client = MlflowClient()
    run_id = json.loads((out / "trackers.json").read_text())["mlflow_run_id"]

    def history(name: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))

    first_train, first_eval = records(out, "train"), records(out, "eval")
    for key, name in (("loss", "train/loss"), ("lr", "train/learning_rate"), ("grad_norm", "train/grad_norm")):
        assert history(name) == [(r["step"], pytest.approx(r[key], rel=1e-9)) for r in first_train], name
    assert history("eval/loss") == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-9)) for r in first_eval]
    run = client.get_run(run_id)
    assert run.info.run_name == "ml-test" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "qlora-tests"
    assert run.data.params["lora_r"] == "16" and run.data.params["max_steps"] == "4"

    run_train(cfg.model_copy(update={"max_steps": 6, "resume_from_checkpoint": "auto"}), console=quiet_console)
    assert json.loads((out / "trackers.json").read_text())["mlflow_run_id"] == run_id  # the same run
    final = {r["step"]: r for r in records(out, "train")}
    first = {r["step"]: r for r in first_train}
    lr = history("train/learning_rate")
    assert [s for s, _ in lr] == [1, 2, 3, 4, 5, 6]  # no step twice
    # steps 3 and 4, trained again under the 6-step schedule, keep the first run's values; 5 and 6 are new
    assert lr == [(s, pytest.approx((first if s <= 4 else final)[s]["lr"], rel=1e-9)) for s in range(1, 7)]
    assert [s for s, _ in history("eval/loss")] == [2, 4, 6]
    assert history("train/loss")[4:] == [(s, pytest.approx(final[s]["loss"], rel=1e-9)) for s in (5, 6)]
    assert client.get_run(run_id).data.params["max_steps"] == "4"  # hyperparameters are not logged again


def test_wandb_keys(tmp_path):
    base = {"base_model": "org/m", "datasets": [{"path": "d.jsonl"}]}
    cfg = load_config(None, **base, report_to="wandb", wandb_project="p", wandb_entity="team")
    assert (cfg.wandb_project, cfg.wandb_entity) == ("p", "team")
    for key in ("wandb_project", "wandb_entity"):
        with pytest.raises(ConfigError, match=rf"key '{key}': needs report_to: \[wandb\]"):
            load_config(None, **base, report_to="tensorboard", **{key: "x"})
