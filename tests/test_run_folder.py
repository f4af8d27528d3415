from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qlora_cli.errors import ModelError
from qlora_cli.run_folder import load_adapted_model, open_run
from qlora_cli.train.loop import run_train

from .conftest import make_config, upper_rows, write_jsonl


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, llama_dir):
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("run-folder")
    data = write_jsonl(tmp / "d.jsonl", upper_rows(16, seed=1))
    cfg = make_config(llama_dir, data, tmp / "run", max_steps=3, learning_rate=1e-2)
    run_train(cfg, console=Console(quiet=True))
    return cfg


def test_open_a_run_folder(trained_run):
    run = open_run(trained_run.output_dir)
    assert run.config == trained_run
    assert run.model.base_model == trained_run.base_model and run.model.quant.compute_dtype == "float32"
    assert run.model.tokenizer == str(run.path)


def test_bare_adapter_folder_and_base_override(trained_run, tmp_path, model_factory):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(f"{trained_run.output_dir}/{name}", bare / name)
    run = open_run(bare)
    assert run.config is None and run.model.base_model == trained_run.base_model and run.model.tokenizer is None
    assert run.model.quant.load_in_4bit and run.model.quant.quant_type == "nf4"
    other = str(model_factory("llama"))
    assert open_run(bare, base=other).model.base_model == other
    cfg = json.loads((bare / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="names no base_model"):
        open_run(bare)


def test_loaded_model_equals_training_time_model(trained_run):
    run = open_run(trained_run.output_dir)
    model, tok = load_adapted_model(run, torch.device("cpu"))
    assert tok.pad_token_id is not None and not model.training
    ids = torch.randint(6, 90, (1, 8))
    again, _ = load_adapted_model(run, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)


def test_missing_folders(tmp_path):
    with pytest.raises(ModelError, match="run folder not found"):
        open_run(tmp_path / "nope")
    with pytest.raises(ModelError, match="missing adapter_config.json"):
        open_run(tmp_path)


def test_a_checkpoint_inside_a_run_loads_as_the_run_trained(tmp_path, llama_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=2))
    cfg = make_config(llama_dir, data, tmp_path / "run", max_steps=3, save_steps=2)
    run_train(cfg, console=quiet_console)
    run = open_run(tmp_path / "run" / "checkpoints" / "step-2")
    assert run.config == cfg and run.model.quant.compute_dtype == "float32"
    assert run.model.tokenizer == str((tmp_path / "run").resolve())


def test_folder_kind_classifies_every_input(tmp_path):
    """One function decides what a folder is (eval, generate, inspect and serve used to decide on their own)."""
    from qlora_cli.run_folder import folder_kind

    def folder(name: str, *files: str) -> Path:
        path = tmp_path / name
        path.mkdir(parents=True)
        for f in files:
            (path / f).write_text("{}")
        return path

    adapter = ("adapter_config.json", "adapter_model.safetensors")
    run = folder("run", *adapter, "metrics.jsonl")
    (run / "qlora_config.yaml").write_text(
        "base_model: x\ndatasets: []\noutput_dir: run\nlora_r: 8\nlearning_rate: 1\n"
    )
    assert folder_kind(run) == "run"
    assert folder_kind(folder("run/checkpoints/step-2", *adapter)) == "checkpoint"
    assert folder_kind(folder("run/best", *adapter)) == "best"
    assert folder_kind(folder("bare", *adapter)) == "adapter"
    assert folder_kind(folder("half", "adapter_config.json")) == "adapter"  # reading it says what is missing
    assert folder_kind(folder("merged", "config.json", "model.safetensors")) == "model"
    # a merged model that kept a stray adapter file is still a model (it used to be, in generate and eval)
    assert folder_kind(folder("merged-stray", "config.json", "adapter_config.json")) == "model"
    assert folder_kind(folder("both", "config.json", *adapter)) == "adapter"
    assert folder_kind(folder("empty")) == "other"
    assert folder_kind(tmp_path / "nope") == "missing"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert folder_kind(tmp_path / "m.gguf") == "gguf"
    assert folder_kind(tmp_path / "run" / "metrics.jsonl") == "file"
