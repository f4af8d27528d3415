"""Tiny models and tokenizers built in code; nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from qlora_cli.config import RunConfig, load_config
from qlora_cli.model import quiet_libraries
from qlora_cli.testing.tiny import build_char_tokenizer, build_tiny_model

quiet_libraries()

# arch -> the linear-layer suffixes that all-linear must find (the output head excluded)
EXPECTED_LINEAR = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"],
}
ARCHS = list(EXPECTED_LINEAR)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """model_factory(arch, **kw) -> folder of a saved tiny random model (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", **kw: Any) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = build_tiny_model(folder, arch, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(model_factory) -> Path:
    return model_factory("llama", initializer_range=0.1)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def upper_rows(n: int, seed: int) -> list[dict]:
    """A tiny task: upper-case a 3-5 letter word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 5)))
        rows.append({"prompt": f"upper: {w}\nanswer: ", "completion": w.upper()})
    return rows


def make_config(base: Path, data: Path, out: Path, **kw: Any) -> RunConfig:
    fields = dict(
        base_model=str(base),
        datasets=[{"path": str(data), "type": "completion"}],
        bnb_4bit_compute_dtype="float32",
        lora_dropout=0.0,
        micro_batch_size=8,
        max_steps=4,
        logging_steps=1,
        output_dir=str(out),
        gradient_checkpointing=False,
        device="cpu",
    )
    fields.update(kw)
    return load_config(None, **fields)


@pytest.fixture
def quiet_console():
    from rich.console import Console

    return Console(quiet=True)


@pytest.fixture(scope="session", autouse=True)
def _qlora_cache(tmp_path_factory):
    """qlora's cache (GGUF conversions) in the session's temporary folder, not the user's; subprocesses
    inherit it. A cache the caller set (QLORA_CACHE) is kept."""
    if "QLORA_CACHE" in os.environ:
        yield
        return
    os.environ["QLORA_CACHE"] = str(tmp_path_factory.mktemp("qlora-cache"))
    yield
    del os.environ["QLORA_CACHE"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
