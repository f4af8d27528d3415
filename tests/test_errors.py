"""The bad-input catalogue: each entry is one line naming the problem, exit code 2, nothing written."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qlora_cli.cli import app

from .conftest import upper_rows, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir):
    """A good config, data files of every kind of badness, and a finished run with a checkpoint."""
    from rich.console import Console

    from qlora_cli.train.loop import run_train

    from .conftest import make_config

    root = tmp_path_factory.mktemp("errors")
    good = write_jsonl(root / "good.jsonl", upper_rows(8, seed=1))
    (root / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion"\n')
    write_jsonl(root / "missing_field.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "only"}])
    (root / "empty.jsonl").write_text("")
    (root / "data.txt").write_text("hello\n")
    write_jsonl(root / "long.jsonl", [{"prompt": "p" * 40, "completion": "c"}] * 3)
    no_weights = root / "no-weights"
    no_weights.mkdir()
    for f in llama_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, no_weights / f.name)
    pickle_only = root / "pickle-only"
    shutil.copytree(no_weights, pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"not really")
    (root / "a-file").write_text("x")
    nonempty = root / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    run_cfg = make_config(llama_dir, good, root / "run", max_steps=3, save_steps=2, micro_batch_size=4)
    run_train(run_cfg, console=Console(quiet=True))
    ckpt = root / "run" / "checkpoints" / "step-2"
    no_adapter = root / "ckpt-no-adapter"
    shutil.copytree(ckpt, no_adapter)
    (no_adapter / "adapter_model.safetensors").unlink()
    misfit = root / "ckpt-misfit"
    shutil.copytree(ckpt, misfit)
    state = load_file(misfit / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    state[key] = torch.zeros(3, 7)
    save_file(state, misfit / "adapter_model.safetensors")
    base = {
        "base_model": str(llama_dir),
        "datasets": [{"path": str(good), "type": "completion"}],
        "bnb_4bit_compute_dtype": "float32",
        "max_steps": 1,
        "micro_batch_size": 4,
        "gradient_checkpointing": False,
        "device": "cpu",
    }
    return root, base, run_cfg


def _cfg(root: Path, base: dict, case: str, **kw) -> Path:
    cfg = {**base, "output_dir": str(root / f"out-{case}"), **kw}
    path = root / f"{case}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CATALOGUE = [
    # (case, how to build the command, fragment of the one-line message)
    ("missing-config", lambda r, b: ["train", str(r / "nope.yaml")], "config file not found"),
    (
        "yaml-syntax",
        lambda r, b: ["train", str(_write(r / "syntax.yaml", "base_model: x\nlora_r: [1, 2\n"))],
        "invalid YAML at line",
    ),
    (
        "unknown-key",
        lambda r, b: ["train", str(_cfg(r, b, "unknown-key", lora_rank=8))],
        "unknown key 'lora_rank' (did you mean 'lora_r'?)",
    ),
    (
        "wrong-type",
        lambda r, b: ["train", str(_cfg(r, b, "wrong-type", micro_batch_size="four"))],
        "key 'micro_batch_size': input should be a valid integer",
    ),
    (
        "lora-r",
        lambda r, b: ["train", str(_cfg(r, b, "lora-r", lora_r=0))],
        "key 'lora_r': input should be greater than 0",
    ),
    ("lora-alpha", lambda r, b: ["train", str(_cfg(r, b, "lora-alpha", lora_alpha=-2))], "key 'lora_alpha'"),
    (
        "lora-dropout",
        lambda r, b: ["train", str(_cfg(r, b, "lora-dropout", lora_dropout=1.0))],
        "key 'lora_dropout': input should be less than 1",
    ),
    (
        "targets",
        lambda r, b: ["train", str(_cfg(r, b, "targets", lora_target_modules=["attn"]))],
        "'attn' matches no module; linear layers in this model: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
    ),
    (
        "base-missing",
        lambda r, b: ["train", str(_cfg(r, b, "base-missing", base_model=str(r / "no-model")))],
        "base_model folder not found",
    ),
    (
        "base-no-weights",
        lambda r, b: ["train", str(_cfg(r, b, "base-no-weights", base_model=str(r / "no-weights")))],
        "has no weights",
    ),
    (
        "base-pickle-only",
        lambda r, b: ["train", str(_cfg(r, b, "base-pickle", base_model=str(r / "pickle-only")))],
        "has only pickle weights (pytorch_model.bin)",
    ),
    (
        "data-missing",
        lambda r, b: ["train", str(_cfg(r, b, "data-missing", datasets=[{"path": str(r / "x.jsonl")}]))],
        "dataset file not found",
    ),
    (
        "data-extension",
        lambda r, b: ["train", str(_cfg(r, b, "data-ext", datasets=[{"path": str(r / "data.txt")}]))],
        "unsupported dataset file extension '.txt'",
    ),
    (
        "data-empty",
        lambda r, b: ["train", str(_cfg(r, b, "data-empty", datasets=[{"path": str(r / "empty.jsonl")}]))],
        "has no rows",
    ),
    (
        "data-malformed",
        lambda r, b: ["train", str(_cfg(r, b, "data-bad", datasets=[{"path": str(r / "bad.jsonl")}]))],
        "bad.jsonl:2: malformed JSON",
    ),
    (
        "data-missing-field",
        lambda r, b: ["train", str(_cfg(r, b, "data-field", datasets=[{"path": str(r / "missing_field.jsonl")}]))],
        "missing_field.jsonl:2: row is missing field 'completion'",
    ),
    (
        "all-truncated",
        lambda r, b: [
            "train",
            str(_cfg(r, b, "truncated", sequence_len=16, datasets=[{"path": str(r / "long.jsonl")}])),
        ],
        "no training examples left",
    ),
    ("sequence-len", lambda r, b: ["train", str(_cfg(r, b, "seq", sequence_len=1))], "key 'sequence_len'"),
    ("micro-batch", lambda r, b: ["train", str(_cfg(r, b, "mb", micro_batch_size=0))], "key 'micro_batch_size'"),
    (
        "output-not-empty",
        lambda r, b: ["train", str(_cfg(r, b, "ne", output_dir=str(r / "nonempty")))],
        "exists and is not empty (use --force",
    ),
    ("output-is-file", lambda r, b: ["train", str(_cfg(r, b, "file", output_dir=str(r / "a-file")))], "is a file"),
    (
        "checkpoint-missing-files",
        lambda r, b: ["train", str(_cfg(r, b, "ck1", resume_from_checkpoint=str(r / "ckpt-no-adapter")))],
        "is missing adapter_model.safetensors",
    ),
    (
        "checkpoint-misfit",
        lambda r, b: ["train", str(_cfg(r, b, "ck2", resume_from_checkpoint=str(r / "ckpt-misfit")))],
        "does not fit this model",
    ),
    ("optimizer", lambda r, b: ["train", str(_cfg(r, b, "opt", optimizer="lion"))], "key 'optimizer'"),
    ("scheduler", lambda r, b: ["train", str(_cfg(r, b, "sched", lr_scheduler="onecycle"))], "key 'lr_scheduler'"),
    ("cuda-missing", lambda r, b: ["train", str(_cfg(r, b, "cuda", device="cuda"))], "no CUDA GPU is available"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case,command,fragment", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue(world, case, command, fragment):
    root, base, run_cfg = world
    if case.startswith("checkpoint"):  # resuming a checkpoint from the finished run's config
        base = {**base, **{k: v for k, v in run_cfg.model_dump(mode="json").items() if k != "output_dir"}}
    before = sorted(p.name for p in root.iterdir())
    result = CliRunner().invoke(app, command(root, base))
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    after = sorted(p.name for p in root.iterdir())
    new = set(after) - set(before)
    assert not {n for n in new if n.startswith("out-")}, new  # nothing written
    assert sorted(p.name for p in (root / "nonempty").iterdir()) == ["keep.txt"]


def test_bitsandbytes_missing(world, monkeypatch):
    root, base, _ = world
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    result = CliRunner().invoke(app, ["train", str(_cfg(root, base, "nobnb"))])
    assert result.exit_code == 2 and "load_in_4bit: true needs bitsandbytes" in result.stderr
    assert not (root / "out-nobnb").exists()


def test_pickle_weights_only_when_asked(world):
    root, base, _ = world
    # with the opt-in, the loader goes on to read the (bogus) pickle file instead of refusing it up front
    result = CliRunner().invoke(
        app,
        ["train", str(_cfg(root, base, "pickle-ok", base_model=str(root / "pickle-only"), allow_pickle_weights=True))],
    )
    assert "has only pickle weights" not in result.stderr
