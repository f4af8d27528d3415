"""A GGUF file as the base: converted once into a cached safetensors folder equal to what transformers'
own GGUF loader builds, then trained, evaluated, inspected and merged like any folder; broken files are one
error line. Tiny GGUF files are written in code (tests/gguf_files.py); the real SmolLM2 file is in
test_real_model.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.merge import run_merge
from qlora_cli.model.gguf import gguf_cache_folder, gguf_folder
from qlora_cli.model.loading import load_base_model, load_tokenizer
from qlora_cli.run_folder import load_adapted_model, open_run
from qlora_cli.train.loop import run_train

from .conftest import make_config, write_jsonl
from .gguf_files import byte_level_tokens, write_tiny_gguf

gguf = pytest.importorskip("gguf")
CPU = torch.device("cpu")


def chat_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5)))
        rows.append(
            {"messages": [{"role": "user", "content": f"upper {w}"}, {"role": "assistant", "content": w.upper()}]}
        )
    return rows


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def gguf_run(gguf_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-run")
    data = write_jsonl(root / "train.jsonl", chat_rows(64, seed=1))
    cfg = make_config(
        gguf_file, data, root / "run", max_steps=6, learning_rate=1e-2, lora_target_modules="all-linear",
        datasets=[{"path": str(data), "type": "chat"}],
    )  # fmt: skip
    run_train(cfg, console=Console(quiet=True))
    return root / "run"


def test_converted_folder_is_transformers_own_gguf_load(gguf_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder(str(gguf_file), "float32")
    assert gguf_folder(str(gguf_file), "float32") == folder  # converted once, then reused
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "héllo"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits, atol=0, rtol=0)
    assert tok.decode(ids[0]) == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"
    bf16 = gguf_folder(str(gguf_file), "bfloat16")  # another compute dtype: another conversion
    header = json.loads((bf16 / "model.safetensors").read_bytes()[8:4096].split(b"}}", 1)[0] + b"}}")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_load_base_model_quantizes_the_gguf_like_its_folder(gguf_file):
    settings = make_config(gguf_file, Path("unused.jsonl"), Path("unused")).base
    model = load_base_model(settings, CPU)
    tok = load_tokenizer(settings)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and tok.pad_token_id is not None


def test_train_records_the_gguf_and_merge_writes_a_plain_folder(gguf_run, gguf_file, tmp_path):
    saved = yaml.safe_load((gguf_run / "qlora_config.yaml").read_text())
    assert saved["base_model"] == str(gguf_file)
    assert json.loads((gguf_run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf_file)
    assert "<|im_start|>" in load_tokenizer(open_run(gguf_run).model).chat_template
    for mode in ("dequantized", "original"):
        result = run_merge(gguf_run, tmp_path / mode, base_weights=mode, dtype="float32", console=Console(quiet=True))
        assert result.check.passed, result.check
        assert (tmp_path / mode / "config.json").exists() and not list((tmp_path / mode).glob("*.gguf"))
    # dequantized: the merged folder is the training-time model (adapter on the NF4 base) to float32 rounding
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32).eval()
    trained, tok = load_adapted_model(open_run(gguf_run), CPU)
    ids = torch.tensor([tok("<|im_start|>user\nupper abc<|im_end|>\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_eval_and_inspect_read_a_gguf_run(gguf_run, gguf_file, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", chat_rows(6, seed=2))
    out = tmp_path / "eval.json"
    args = ["eval", str(gguf_run), "--data", str(data), "--type", "chat", "--device", "cpu", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    models = json.loads(out.read_text())["models"]
    assert [m["name"] for m in models] == ["base", "run"] and models[1]["loss"] < models[0]["loss"]
    result = CliRunner().invoke(app, ["inspect", str(gguf_run / "qlora_config.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"architecture": "LlamaForCausalLM"' in result.stdout


# ---------------------------------------------------------------------------------------------
# bad files: one line, exit 2, nothing written (no output folder, nothing in the cache)


def _bad_not_gguf(d: Path) -> Path:
    (d / "notes.gguf").write_text("this is not a model\n")
    return d / "notes.gguf"


def _bad_truncated(d: Path) -> Path:
    good = write_tiny_gguf(d / "full.gguf").read_bytes()
    (d / "cut.gguf").write_bytes(good[: len(good) * 2 // 3])
    (d / "full.gguf").unlink()
    return d / "cut.gguf"


def _bad_header_only(d: Path) -> Path:
    good = write_tiny_gguf(d / "full.gguf").read_bytes()
    (d / "cut.gguf").write_bytes(good[:200])  # cut inside the metadata
    (d / "full.gguf").unlink()
    return d / "cut.gguf"


DUPLICATE = [*byte_level_tokens(), "he", "he", "<|im_end|>"]  # id 257 is BOS: it would name "he"
I8_TENSOR = ("output.weight", np.ones((259, 64), np.int8), "I8")
EMPTY_TENSOR = ("output.weight", np.zeros((0, 64), np.float32), None)

BAD = [
    ("not-gguf", _bad_not_gguf, "is not a GGUF file"),
    ("truncated", _bad_truncated, "is truncated"),
    ("header-only", _bad_header_only, "is truncated or corrupt"),
    ("architecture", lambda d: write_tiny_gguf(d / "x.gguf", arch="mamba9"), "architecture 'mamba9' cannot be read"),
    ("no-tokenizer", lambda d: write_tiny_gguf(d / "x.gguf", tokenizer=False), "has no tokenizer"),
    ("missing", lambda d: d / "nope.gguf", "GGUF file not found"),
    # broken tokenizer metadata: transformers' tokenizer builder raised IndexError, KeyError, a bare Exception
    ("merge-unknown", lambda d: write_tiny_gguf(d / "x.gguf", merges=["h zz"]), "names 'zz', which is not in"),
    ("merge-no-space", lambda d: write_tiny_gguf(d / "x.gguf", merges=["he"]), "is not two tokens and a space"),
    ("no-merges", lambda d: write_tiny_gguf(d / "x.gguf", merges=[]), "needs tokenizer.ggml.merges"),
    ("bos-out-of-range", lambda d: write_tiny_gguf(d / "x.gguf", bos=100000), "bos_token_id is 100000, not one of"),
    ("tokenizer-model", lambda d: write_tiny_gguf(d / "x.gguf", tokenizer_model="foo"), "tokenizer.ggml.model 'foo'"),
    (
        "duplicate-token",
        lambda d: write_tiny_gguf(d / "x.gguf", tokens=DUPLICATE),
        "holds 'he' twice (ids 256 and 257)",
    ),
    ("empty-tokens", lambda d: write_tiny_gguf(d / "x.gguf", tokens=[]), "has no tokenizer"),
    # tensors: a type the gguf package cannot dequantize; a zero-sized one (it was cached, then failed every run)
    ("i8-tensor", lambda d: write_tiny_gguf(d / "x.gguf", extra_tensor=I8_TENSOR), "output.weight is stored as I8"),
    ("zero-sized", lambda d: write_tiny_gguf(d / "x.gguf", extra_tensor=EMPTY_TENSOR), "has a zero-sized dimension"),
    # a 2 MiB description: transformers decodes text byte by byte (64 MiB took minutes and gigabytes)
    (
        "huge-text",
        lambda d: write_tiny_gguf(d / "x.gguf", description="x" * (2 << 20)),
        "general.description holds 2.0 MiB",
    ),
]


TENSOR_OR_HEADER = {"not-gguf", "truncated", "header-only", "architecture", "missing", "i8-tensor", "zero-sized",
                    "huge-text"}  # fmt: skip


@pytest.mark.parametrize("case,make,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_gguf_is_one_line_and_writes_nothing(case, make, fragment, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QLORA_CACHE", str(cache))
    files = tmp_path / "files"
    files.mkdir()
    path = make(files)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4, seed=0))
    cfg = {
        "base_model": str(path), "datasets": [{"path": str(data), "type": "chat"}], "bnb_4bit_compute_dtype": "float32",
        "max_steps": 1, "output_dir": str(tmp_path / "out"), "device": "cpu", "gradient_checkpointing": False,
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    commands = [["train", str(tmp_path / "c.yaml")]]
    if case in TENSOR_OR_HEADER:  # the memory plan needs no tokenizer
        commands.append(["inspect", str(tmp_path / "c.yaml")])
    for command in commands:
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (command, result.output, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "out").exists() and not cache.exists()


def test_missing_gguf_package_is_named(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4, seed=0))
    cfg = make_config(gguf_file, data, tmp_path / "out")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "needs the gguf package: pip install 'gguf>=" in result.stderr, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_the_cache_follows_the_file(gguf_file, tmp_path):
    """A changed file (new mtime/size) is converted anew, never served from the old conversion."""
    copy = tmp_path / "m.gguf"
    copy.write_bytes(gguf_file.read_bytes())
    first = gguf_cache_folder(str(copy), "float32")
    write_tiny_gguf(copy, seed=1)
    assert gguf_cache_folder(str(copy), "float32") != first


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "manifest"])
def test_a_damaged_conversion_in_the_cache_is_rebuilt_not_trained_on(gguf_file, tmp_path, monkeypatch, damage):
    """A cut model.safetensors was a traceback on every run, never rebuilt; bytes overwritten with NaN trained
    silently. The cache entry's files are checked against the sizes and checksums written with it."""
    import hashlib

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    folder = gguf_folder(str(gguf_file), "float32")
    weights = folder / "model.safetensors"
    good = hashlib.sha256(weights.read_bytes()).hexdigest()
    raw = bytearray(weights.read_bytes())
    if damage == "truncated":
        weights.write_bytes(raw[: len(raw) * 2 // 3])
    elif damage == "overwritten":
        raw[-4096:] = b"\xff" * 4096  # NaN float32s, same size
        weights.write_bytes(bytes(raw))
    else:
        (folder / "manifest.json").write_text("{")
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4, seed=0))
    cfg = make_config(gguf_file, data, tmp_path / "out", max_steps=1, datasets=[{"path": str(data), "type": "chat"}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    assert "is damaged or incomplete" in result.stderr and "rebuilding it" in result.stderr, result.stderr
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == good
    assert [p.name for p in folder.parent.glob(".*")] == [f".{folder.name}.lock"]  # no damaged copy, no temp folder
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--force"])
    assert result.exit_code == 0 and "rebuilding" not in result.stderr, result.output


def test_a_gguf_without_a_tokenizer_trains_and_exports_with_the_runs_own(gguf_file, tmp_path, monkeypatch):
    """export read tokenizer.ggml.tokens from the GGUF base whatever the run trained with: a KeyError traceback
    for a base without a tokenizer, a silently different vocabulary for one whose tokenizer the run replaced."""
    from .test_export import read_gguf

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    tokenizer = gguf_folder(str(gguf_file), "float32")  # as a tokenizer folder: 260 tokens (transformers adds one)
    bare = write_tiny_gguf(tmp_path / "bare.gguf", tokenizer=False, rows=260)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8, seed=0))
    cfg = make_config(
        bare, data, tmp_path / "run", max_steps=1, tokenizer=str(tokenizer),
        datasets=[{"path": str(data), "type": "chat"}], lora_target_modules="all-linear",
    )  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")]).exit_code == 0
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "run"), "-o", str(out), "--quant", "f32", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and out.read_bytes()[:4] == b"GGUF"
    assert read_gguf(out)["token_embd.weight"].shape[0] == 260
    from qlora_cli.model.gguf import field_value

    tokens = field_value(gguf.GGUFReader(out).fields["tokenizer.ggml.tokens"])
    assert len(tokens) == 260 and tokens[-1] == "<|endoftext|>"  # the run's tokenizer, as it trained
