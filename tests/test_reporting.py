"""Seeing a run: early stopping and the best adapter, the model card, loss plots, experiment trackers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlora_cli.train.loop as train_mod
from qlora_cli.config import load_config
from qlora_cli.layout import BEST_DIR, BEST_FILE
from qlora_cli.model_card import base_license, card_metadata, front_matter
from qlora_cli.run_folder import open_run
from qlora_cli.train.loop import run_train
from qlora_cli.train.loss import EvalResult

from .conftest import make_config, upper_rows, write_jsonl
from .test_cli import assert_user_error, run_cli, write_config


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def scripted_eval(monkeypatch):
    """Make the eval loss follow a script: the n-th eval of the run returns losses[n]."""

    def use(losses: list[float]) -> list[int]:
        calls: list[int] = []

        def fake(*args, **kwargs):
            calls.append(len(calls))
            return EvalResult(losses[len(calls) - 1], 100)

        monkeypatch.setattr(train_mod, "evaluate_loss", fake)
        return calls

    return use


def test_early_stopping_stops_at_the_expected_step_and_keeps_the_best(
    tmp_path, llama_dir, quiet_console, scripted_eval
):
    """Eval every step; the loss falls to its best at step 3 (2.0), then rises: with patience 2 the run stops
    after the evals of steps 4 and 5, at step 5 of 10, and best/ holds the adapter of step 3."""
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=1))
    scripted_eval([3.0, 2.5, 2.0, 2.1, 2.3, 2.6, 2.8, 3.0, 3.1, 3.2])
    cfg = make_config(
        llama_dir, data, tmp_path / "run", max_steps=10, micro_batch_size=4, eval_steps=1, save_steps=1,
        learning_rate=1e-2, eval_datasets=[{"path": str(data)}], early_stopping_patience=2, save_best=True,
    )  # fmt: skip
    result = run_train(cfg, console=quiet_console)
    out = result.output_dir
    assert result.steps == 5
    assert "not improved on 2.0000 (step 3)" in result.stopped_early
    recs = records(out)
    assert [r["step"] for r in recs if r["type"] == "eval"] == [1, 2, 3, 4, 5]  # no extra eval after the stop
    summary = recs[-1]
    assert summary["type"] == "summary" and summary["steps"] == 5
    assert summary["best_step"] == 3 and summary["best_eval_loss"] == 2.0 and summary["stopped_early"]
    assert json.loads((out / BEST_DIR / BEST_FILE).read_text()) == {"step": 3, "eval_loss": 2.0}
    best = load_file(out / BEST_DIR / "adapter_model.safetensors")
    at_3 = load_file(out / "checkpoints" / "step-3" / "adapter_model.safetensors")
    at_5 = load_file(out / "adapter_model.safetensors")
    assert best.keys() == at_3.keys()
    for k in best:
        torch.testing.assert_close(best[k], at_3[k], rtol=0, atol=0)
    assert any(not torch.equal(best[k], at_5[k]) for k in best if "lora_B" in k)  # training moved on after it
    assert not list(out.glob(".best*"))  # no temporary folder left
    assert open_run(out / BEST_DIR).config == cfg  # later commands find the run's config from best/


def test_threshold_counts_small_gains_as_no_improvement(tmp_path, llama_dir, quiet_console, scripted_eval):
    """With threshold 0.1, falls of 0.05 are not improvements: patience 2 stops at step 3."""
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    scripted_eval([3.0, 2.95, 2.9, 2.85, 2.8, 2.75])
    cfg = make_config(
        llama_dir, data, tmp_path / "run", max_steps=6, micro_batch_size=4, eval_steps=1, val_set_size=0.25,
        early_stopping_patience=2, early_stopping_threshold=0.1,
    )  # fmt: skip
    result = run_train(cfg, console=quiet_console)
    assert result.steps == 3 and result.stopped_early
    assert not (result.output_dir / BEST_DIR).exists()  # save_best is off


def test_without_a_stop_the_final_eval_counts_for_best(tmp_path, llama_dir, quiet_console, scripted_eval):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    calls = scripted_eval([3.0, 2.9, 2.0])
    cfg = make_config(
        llama_dir, data, tmp_path / "run", max_steps=3, micro_batch_size=4, eval_steps=1,
        eval_datasets=[{"path": str(data)}], early_stopping_patience=1, save_best=True,
    )  # fmt: skip
    result = run_train(cfg, console=quiet_console)
    assert result.steps == 3 and result.stopped_early is None and len(calls) == 3
    best = load_file(result.output_dir / BEST_DIR / "adapter_model.safetensors")
    final = load_file(result.output_dir / "adapter_model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_early_stopping_cli_exit_codes(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    cfg = write_config(tmp_path, llama_dir, data, early_stopping_patience=2, eval_steps=1)
    assert_user_error(run_cli("train", str(cfg)), "'early_stopping_patience': needs eval data", tmp_path / "run")
    cfg = write_config(tmp_path, llama_dir, data, save_best=True)
    assert_user_error(run_cli("train", str(cfg)), "'save_best': needs eval data", tmp_path / "run")
    cfg = write_config(tmp_path, llama_dir, data, early_stopping_patience=2, eval_datasets=[{"path": str(data)}])
    assert_user_error(run_cli("train", str(cfg)), "needs eval_steps", tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# the model card


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, llama_dir):
    """A 4-step run with eval every 2 steps and save_best: the folder later tests read."""
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("finished")
    data = write_jsonl(tmp / "d.jsonl", upper_rows(16, seed=3))
    cfg = make_config(
        llama_dir, data, tmp / "run", max_steps=4, micro_batch_size=4, eval_steps=2, save_best=True,
        eval_datasets=[{"path": str(data)}], learning_rate=1e-2,
    )  # fmt: skip
    result = run_train(cfg, console=Console(quiet=True))
    return cfg, result


def test_model_card_front_matter_and_figures(finished_run):
    cfg, result = finished_run
    text = (result.output_dir / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == cfg.base_model and meta["library_name"] == "peft"
    assert {"qlora", "lora", "peft", "nf4"} <= set(meta["tags"])
    assert "datasets" not in meta and "license" not in meta  # local data files; a base without a known license
    recs = records(result.output_dir)
    evals = [r for r in recs if r["type"] == "eval"]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert f"final eval loss: {evals[-1]['eval_loss']:.4f}" in text
    assert f"best eval loss: {best['eval_loss']:.4f} at step {best['step']}" in text
    assert f"`best/` holds the adapter of step {best['step']}" in text
    assert "| LoRA r / alpha / dropout | 16 / 32 / 0 |" in text
    assert "PeftModel.from_pretrained" in text and "vllm serve" in text and "qlora serve --adapter run=./run" in text


def test_model_card_metadata_hub_names_and_license(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(4, seed=1))
    cfg = load_config(
        None,
        base_model="org/some-model",
        datasets=[{"path": "tatsu-lab/alpaca", "type": "alpaca"}, {"path": str(data)}],
    )
    meta = card_metadata(cfg)
    assert meta["datasets"] == ["tatsu-lab/alpaca"] and "base_model:adapter:org/some-model" in meta["tags"]
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a model\n")
    assert card_metadata(cfg.model_copy(update={"base_model": str(base)}))["license"] == "apache-2.0"
    assert base_license(str(tmp_path)) is None


def test_peft_loads_the_run_folder_with_its_card(finished_run, llama_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, result = finished_run
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), result.output_dir)
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    key = next(k for k in saved if "lora_B" in k)
    torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], saved[key])
    assert saved[key].abs().sum() > 0


def test_eval_json_refreshes_the_card(finished_run, tmp_path):
    from rich.console import Console

    from qlora_cli.evaluate import EvalOptions, run_eval

    _, result = finished_run
    report = run_eval(
        [result.output_dir], EvalOptions(limit=4, max_new_tokens=2, device="cpu"), json_path=tmp_path / "r.json",
        console=Console(quiet=True),
    )  # fmt: skip
    text = (result.output_dir / "README.md").read_text()
    adapter = next(m for m in report.models if m.name != "base")
    assert f"| run | {adapter.loss:.4f} |" in text and "| base |" in text
    assert front_matter(text)["library_name"] == "peft"


# ---------------------------------------------------------------------------------------------
# plots


def write_metrics(folder: Path, records_: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records_))
    return folder


def fake_run(folder: Path, steps: int, scale: float, resumed_at: int | None = None) -> Path:
    """A metrics.jsonl with falling loss; ``resumed_at``: steps after it logged twice (an older log segment)."""
    recs = []
    for s in range(1, steps + 1):
        recs.append({"type": "train", "step": s, "loss": scale / s, "lr": 1e-3 * (1 - s / steps), "grad_norm": 1 + s})
        if s % 5 == 0:
            recs.append({"type": "eval", "step": s, "eval_loss": scale / s + 0.1, "eval_ppl": 2.0})
    if resumed_at is not None:
        recs += [r for r in recs if r["step"] > resumed_at]
    recs.append({"type": "summary", "steps": steps})
    return write_metrics(folder, recs)


def test_plot_two_runs_png(tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np
    from matplotlib.image import imread

    from qlora_cli.plot import make_figure, read_curves

    a = fake_run(tmp_path / "run-a", 20, 3.0)
    b = fake_run(tmp_path / "run-b", 20, 5.0, resumed_at=8)
    curves = read_curves(b)
    assert [s for s, _ in curves.loss] == list(range(1, 21))  # the resumed run is one line, no repeated steps
    fig = make_figure([read_curves(a), curves])
    ax_loss = fig.axes[0]
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["run-a", "run-b"]
    colours = {line.get_color() for ax in fig.axes for line in ax.get_lines()}
    assert colours == {"C0", "C1"}
    result = run_cli("plot", str(a), str(b), "-o", str(tmp_path / "curves.png"))
    assert result.exit_code == 0, result.output
    image = imread(tmp_path / "curves.png")
    assert image.shape[:2] == (800, 1200)
    assert float(np.var(image[..., :3])) > 0.01  # not blank
    # both runs' colours are in the picture: C0 (blue, #1f77b4) and C1 (orange, #ff7f0e)
    rgb = (image[..., :3] * 255).round().astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(rgb - colour).sum(axis=-1) < 10).sum() > 500, colour


def test_plot_errors(tmp_path):
    assert_user_error(run_cli("plot", str(tmp_path / "missing")), "no metrics.jsonl")
    empty = write_metrics(tmp_path / "empty", [{"type": "summary", "steps": 0}])
    assert_user_error(run_cli("plot", str(empty)), "nothing to plot")
    run = fake_run(tmp_path / "r", 5, 1.0)
    assert_user_error(run_cli("plot", str(run), "-o", str(tmp_path / "no" / "x.png")), "does not exist")


def test_train_writes_loss_png(finished_run):
    pytest.importorskip("matplotlib")
    _, result = finished_run
    assert (result.output_dir / "loss.png").stat().st_size > 10_000
    assert "![training curves](loss.png)" in (result.output_dir / "README.md").read_text()


def test_train_without_matplotlib_notes_and_goes_on(tmp_path, monkeypatch):
    import builtins

    from rich.console import Console

    from qlora_cli.plot import write_loss_plot

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    console = Console(record=True, width=200)
    assert write_loss_plot(fake_run(tmp_path / "r", 5, 1.0), console) is None
    assert console.export_text().strip() == "no loss.png: matplotlib is not installed (pip install matplotlib)"
    assert not (tmp_path / "r" / "loss.png").exists()


CRAFTED_LINES = [
    b'{"type": "train", "step": 1, "loss": 2.5, "lr": 0.001, "grad_norm": 1.0}\xff\xfe',  # not UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's recursion limit
    b'{"type": "train", "step": "5", "loss": 1.0}',  # a step that is a string
    b'{"type": "train", "step": true, "loss": 1.0}',
    b'{"type": "eval", "step": 6, "eval_loss": "low"}',
    b'{"type": "train", "step": 7, "loss": 1e308, "lr": -1e308, "grad_norm": 1e999}',  # huge, and inf
    b'{"type": "summary", "steps": {"a": 1}}',
    b'["type", "train"]',
]


def test_a_crafted_metrics_log_never_stops_plot_inspect_or_resume(tmp_path, llama_dir):
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    cfg = write_config(tmp_path, llama_dir, data, max_steps=2, save_steps=1)
    assert run_cli("train", str(cfg)).exit_code == 0
    run = tmp_path / "run"
    good = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(good + b"\n".join(CRAFTED_LINES) + b"\n")
    result = run_cli("plot", str(run), "-o", str(tmp_path / "p.png"))
    assert result.exit_code == 0, result.output
    from qlora_cli.plot import read_curves

    curves = read_curves(run)
    assert [s for s, _ in curves.loss] == [1, 2]  # only the real steps: none of the crafted ones
    result = run_cli("inspect", str(run), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["training"]["steps"] == 2
    # resume from step 1: the log keeps the real step-1 records and drops every crafted line
    result = run_cli("train", str(cfg), "--set", "resume_from_checkpoint=" + str(run / "checkpoints" / "step-1"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r.get("step")) for r in records if r["type"] == "train"] == [("train", 1), ("train", 2)]
