"""Checkpoints, exact resume, and non-finite steps."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import qlora_cli.train.loop as train_mod
import qlora_cli.train.step as step_mod
from qlora_cli.errors import ConfigError
from qlora_cli.layout import COMPLETE
from qlora_cli.train.checkpoint import list_checkpoints
from qlora_cli.train.loop import TrainingDiverged, TrainingInterrupted, run_train

from .conftest import make_config, upper_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def run_config(tmp_path, base, out_name, **kw):
    data = tmp_path / "d.jsonl"
    if not data.exists():
        write_jsonl(data, upper_rows(22, seed=3))  # 22 examples, micro-batch 4: 6 windows/epoch, the last one short
    fields = dict(
        max_steps=14,
        micro_batch_size=4,
        save_steps=4,
        lora_dropout=0.1,
        learning_rate=5e-3,
        optimizer="paged_adamw_8bit",
        lora_target_modules="all-linear",
        eval_steps=5,
        eval_datasets=[{"path": str(data)}],
    )
    fields.update(kw)
    return make_config(base, data, tmp_path / out_name, **fields)


def adapter_bytes(run: Path) -> bytes:
    return (run / "adapter_model.safetensors").read_bytes()


def loss_log(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["type"], r["step"], r.get("loss", r.get("eval_loss"))) for r in records if r["type"] in ("train", "eval")
    ]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, llama_dir):
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("reference")
    cfg = run_config(tmp, llama_dir, "run")
    run_train(cfg, console=Console(quiet=True))
    return tmp, cfg


def test_checkpoint_layout(reference_run):
    tmp, cfg = reference_run
    out = Path(cfg.output_dir)
    steps = [s for s, _, ok in list_checkpoints(out) if ok]
    assert steps == [4, 8, 12]
    ckpt = out / "checkpoints" / "step-8"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pt",
        "trainer_state.json",
        COMPLETE,
    ):
        assert (ckpt / name).exists(), name
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        torch.load(ckpt / name, weights_only=True)  # no pickle needed to read a checkpoint
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["window"]) == (8, 1, 2)  # 6 windows per epoch
    assert len(state["config_hash"]) == 16 and state["config"]["lora_r"] == cfg.lora_r
    assert not list((out / "checkpoints").glob(".step-*"))


@pytest.mark.oldest
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, reference_run, llama_dir, monkeypatch, quiet_console):
    """SIGINT at step 6 (mid-epoch, between checkpoints) saves a checkpoint and exits; --resume finishes
    with the same adapter bytes and the same loss log as the uninterrupted run."""
    ref_tmp, ref_cfg = reference_run
    cfg = run_config(tmp_path, llama_dir, "run")
    real = train_mod.accumulate_gradients
    calls = {"n": 0}

    def interrupt_at_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag; the step completes
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "accumulate_gradients", interrupt_at_step_6)
    with pytest.raises(TrainingInterrupted) as e:
        run_train(cfg, console=quiet_console)
    assert e.value.exit_code == 130 and "step 6" in str(e.value)
    assert (tmp_path / "run" / "checkpoints" / "step-6" / COMPLETE).exists()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    monkeypatch.setattr(train_mod, "accumulate_gradients", real)

    resumed = run_train(cfg.model_copy(update={"resume_from_checkpoint": "auto"}), console=quiet_console)
    assert resumed.steps == 14
    assert adapter_bytes(tmp_path / "run") == adapter_bytes(Path(ref_cfg.output_dir))
    assert loss_log(tmp_path / "run") == loss_log(Path(ref_cfg.output_dir))


def test_kill_9_at_a_random_moment_then_resume(tmp_path, reference_run, llama_dir):
    """A run killed with SIGKILL after its first checkpoint resumes, repeats only the steps since the last
    checkpoint, and ends with the uninterrupted run's adapter and loss log."""
    _, ref_cfg = reference_run
    cfg = run_config(tmp_path, llama_dir, "run", save_steps=2)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # save_steps differs from the reference (2 vs 4): it may change on resume and does not change the numbers
    # the real CLI, with each step stretched by a sleep so that the kill lands mid-run
    slow_cli = (
        "import sys, time; import qlora_cli.train.loop as t; real = t.accumulate_gradients\n"
        "def slow(*a, **k):\n    time.sleep(0.15)\n    return real(*a, **k)\n"
        "t.accumulate_gradients = slow\n"
        "from qlora_cli.cli import main; sys.argv = ['qlora', 'train', sys.argv[1]]; main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", slow_cli, str(cfg_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step-2" / COMPLETE).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 1.0))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    done = [s for s, _, ok in list_checkpoints(tmp_path / "run") if ok]
    assert done and max(done) < 14
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "qlora_cli", "train", str(cfg_path), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {max(done)}" in resumed.stderr
    assert adapter_bytes(tmp_path / "run") == adapter_bytes(Path(ref_cfg.output_dir))
    assert loss_log(tmp_path / "run") == loss_log(Path(ref_cfg.output_dir))


def test_incomplete_checkpoints_are_skipped_with_a_warning(tmp_path, reference_run, llama_dir):
    import shutil

    from rich.console import Console

    _, ref_cfg = reference_run
    cfg = run_config(tmp_path, llama_dir, "run", max_steps=8)
    run_train(cfg, console=Console(quiet=True))
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(ckpts / "step-4", ckpts / "step-12")
    (ckpts / "step-12" / COMPLETE).unlink()  # as if the process died between rename and marker
    console = Console(record=True, width=200)
    result = run_train(cfg.model_copy(update={"resume_from_checkpoint": "auto", "max_steps": 14}), console=console)
    text = console.export_text()
    assert "skipping incomplete checkpoint" in text and "step 12" in text
    assert "resuming from" in text and "step-8" in text
    assert result.steps == 14


def test_changed_config_is_refused_naming_the_keys(tmp_path, reference_run, quiet_console):
    _, ref_cfg = reference_run
    changed = ref_cfg.model_copy(update={"resume_from_checkpoint": "auto", "lora_r": 8, "learning_rate": 1e-3})
    with pytest.raises(ConfigError) as e:
        run_train(changed, console=quiet_console)
    assert "config changed (learning_rate, lora_r)" in str(e.value)


def test_save_total_limit_keeps_the_newest(tmp_path, llama_dir, quiet_console):
    cfg = run_config(tmp_path, llama_dir, "run", max_steps=9, save_steps=2, save_total_limit=2, eval_steps=None)
    run_train(cfg, console=quiet_console)
    assert [s for s, _, _ in list_checkpoints(tmp_path / "run")] == [6, 8]


def test_resume_from_an_explicit_path_and_errors(tmp_path, reference_run, quiet_console):
    _, ref_cfg = reference_run
    with pytest.raises(ConfigError, match="checkpoint folder not found"):
        run_train(ref_cfg.model_copy(update={"resume_from_checkpoint": str(tmp_path / "nope")}), console=quiet_console)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, llama_dir, monkeypatch, quiet_console):
    real = step_mod.loss_sum
    calls = {"n": 0}

    def nan_on_2nd_and_3rd(model, batch, *args):
        calls["n"] += 1
        s, n = real(model, batch, *args)
        return (s * float("nan"), n) if calls["n"] in (2, 3) else (s, n)

    monkeypatch.setattr(step_mod, "loss_sum", nan_on_2nd_and_3rd)
    cfg = run_config(
        tmp_path, llama_dir, "run", max_steps=5, save_steps=None, eval_steps=None, logging_steps=1, lora_dropout=0.0
    )
    result = run_train(cfg, console=quiet_console)
    records = [r for r in result.history if r["type"] == "train"]
    assert [r["bad_steps"] for r in records] == [0, 1, 2, 2, 2]
    assert all(r["loss"] == r["loss"] for r in records if r["step"] not in (2, 3))  # finite where not skipped
    assert result.history[-1]["bad_steps"] == 2


def test_too_many_bad_steps_stop_the_run_with_the_checkpoint_intact(tmp_path, llama_dir, monkeypatch, quiet_console):
    real = step_mod.loss_sum
    calls = {"n": 0}

    def nan_after_4(model, batch, *args):
        calls["n"] += 1
        s, n = real(model, batch, *args)
        return (s * float("inf"), n) if calls["n"] > 4 else (s, n)

    monkeypatch.setattr(step_mod, "loss_sum", nan_after_4)
    cfg = run_config(tmp_path, llama_dir, "run", max_steps=30, save_steps=4, eval_steps=None, max_bad_steps=3)
    with pytest.raises(TrainingDiverged) as e:
        run_train(cfg, console=quiet_console)
    assert e.value.exit_code == 1 and "3 consecutive steps" in str(e.value)
    assert [s for s, _, ok in list_checkpoints(tmp_path / "run") if ok] == [4]


def test_mostly_non_finite_steps_stop_the_run_and_write_no_adapter(tmp_path, llama_dir, monkeypatch):
    """Steps 2-4 non-finite (never 10 in a row): once 3 of 4 steps were skipped the run stops, exit 1, with no
    adapter written; it used to finish "done" with exit 0 on an adapter that learned nothing."""
    from .test_cli import run_cli, write_config

    real = step_mod.loss_sum
    calls = {"n": 0}

    def nan_on_steps_2_to_4(model, batch, *args):
        calls["n"] += 1
        s, n = real(model, batch, *args)
        return (s * float("nan"), n) if calls["n"] in (2, 3, 4) else (s, n)

    monkeypatch.setattr(step_mod, "loss_sum", nan_on_steps_2_to_4)
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    cfg = write_config(tmp_path, llama_dir, data, max_steps=9, micro_batch_size=8, save_steps=1)
    result = run_cli("train", str(cfg))
    assert result.exit_code == 1, result.output
    assert "3 of 4 steps had a non-finite loss" in result.output and "max_bad_fraction=0.25" in result.output
    run = tmp_path / "run"
    assert not (run / "adapter_model.safetensors").exists()
    assert [s for s, _, ok in list_checkpoints(run) if ok] == [1, 2, 3]
    # the skipped steps changed nothing: every checkpoint holds step 1's adapter, finite
    from safetensors.torch import load_file

    first, last = (load_file(run / "checkpoints" / f"step-{s}" / "adapter_model.safetensors") for s in (1, 3))
    assert all(torch.equal(first[k], last[k]) and torch.isfinite(last[k]).all() for k in first)


def test_a_non_finite_final_eval_or_adapter_is_not_written(tmp_path, llama_dir, monkeypatch):
    from qlora_cli.model.lora import lora_layers
    from qlora_cli.train.loss import EvalResult

    from .test_cli import run_cli, write_config

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    cfg = write_config(tmp_path, llama_dir, data, eval_datasets=[{"path": str(data), "type": "completion"}])
    monkeypatch.setattr(train_mod, "evaluate_loss", lambda *a, **k: EvalResult(float("nan"), 10))
    result = run_cli("train", str(cfg))
    assert result.exit_code == 1 and "the final eval loss is nan" in result.output, result.output
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    monkeypatch.undo()
    real_evaluate = train_mod.evaluate

    def poison_then_evaluate(run):
        name, layer = next(iter(lora_layers(run.model)))
        with torch.no_grad():
            layer.lora_B.weight[0, 0] = float("inf")
        return real_evaluate(run)

    monkeypatch.setattr(train_mod, "evaluate", poison_then_evaluate)
    result = run_cli("train", str(cfg), "--force")
    assert result.exit_code == 1 and "the adapter has non-finite values" in result.output, result.output
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_fp16_loss_scaling_survives_a_nan_loss_and_counts_it(tmp_path, llama_dir, monkeypatch, quiet_console):
    """With a GradScaler (fp16 on a GPU; a CPU scaler here) a non-finite loss skipped the scaler's update, and the
    next step's unscale_ raised "unscale_() has already been called": a traceback instead of a counted bad step."""
    from qlora_cli.train.step import Precision

    monkeypatch.setattr(
        Precision,
        "for_run",
        classmethod(lambda cls, dtype, device: cls("cpu", torch.float32, torch.amp.GradScaler("cpu"))),
    )
    real = step_mod.loss_sum
    calls = {"n": 0}

    def nan_on_2nd(model, batch, *args):
        calls["n"] += 1
        s, n = real(model, batch, *args)
        return (s * float("nan"), n) if calls["n"] == 2 else (s, n)

    monkeypatch.setattr(step_mod, "loss_sum", nan_on_2nd)
    cfg = run_config(
        tmp_path, llama_dir, "run", max_steps=4, save_steps=None, eval_steps=None, logging_steps=1, lora_dropout=0.0
    )
    result = run_train(cfg, console=quiet_console)
    records = [r for r in result.history if r["type"] == "train"]
    assert [r["bad_steps"] for r in records] == [0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in records if r["step"] != 2)


def test_fp16_a_skipped_step_never_applies_its_gradients(tmp_path, llama_dir, monkeypatch, quiet_console):
    """An infinite loss can come with finite gradients (a constant added, a target logit at -inf): the step is
    skipped and counted, and the optimizer must not step (GradScaler.step would have: no inf in the gradients)."""
    from safetensors.torch import load_file

    from qlora_cli.train.step import Precision

    monkeypatch.setattr(
        Precision,
        "for_run",
        classmethod(lambda cls, dtype, device: cls("cpu", torch.float32, torch.amp.GradScaler("cpu"))),
    )
    real = step_mod.loss_sum
    monkeypatch.setattr(
        step_mod, "loss_sum", lambda model, batch, *a: (lambda s, n: (s + float("inf"), n))(*real(model, batch, *a))
    )
    cfg = run_config(
        tmp_path, llama_dir, "run", max_steps=2, save_steps=None, eval_steps=None, eval_datasets=[], logging_steps=1
    )
    result = train_mod.run_train(cfg, console=quiet_console)
    assert [r["bad_steps"] for r in result.history if r["type"] == "train"] == [1, 2]
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert all(not t.any() for k, t in adapter.items() if "lora_B" in k)  # B starts at zero and never moved


def test_a_checkpoint_from_before_a_key_existed_resumes_while_the_key_keeps_its_default(tmp_path, reference_run):
    """A key added to qlora after a checkpoint was written (absent from its config and hash) counts as unchanged
    while it holds its default; set otherwise, it is a config change like any other."""
    import shutil

    from qlora_cli.train.checkpoint import read_checkpoint

    _, ref_cfg = reference_run
    old = tmp_path / "step-8"
    shutil.copytree(Path(ref_cfg.output_dir) / "checkpoints" / "step-8", old)
    state = json.loads((old / "trainer_state.json").read_text())
    del state["config"]["torch_compile"], state["processes"]
    state["config_hash"] = "0" * 16  # as the older qlora hashed a config without the key
    (old / "trainer_state.json").write_text(json.dumps(state))
    assert read_checkpoint(old, ref_cfg).state.step == 8
    with pytest.raises(ConfigError, match=r"config changed \(torch_compile\)"):
        read_checkpoint(old, ref_cfg.model_copy(update={"torch_compile": True}))
