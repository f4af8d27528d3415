"""Tiny models and tokenizers built in code; nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from qlora_cli.config import RunConfig, load_config
from qlora_cli.model.loading import quiet_libraries
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


@pytest.fixture
def one_thread():
    """torch on one thread for the test (its float32 sums in one order), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(
    args: list[str], log: Path, env: dict | None = None, start_timeout: float = 120
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`qlora serve ARGS` in a subprocess on a free loopback port: (base URL, process) once /health answers;
    stopped (SIGTERM, then kill) on exit. Fails the test with the server's log if it does not start."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "qlora_cli", "serve", "--port", str(port), "--device", "cpu", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"qlora serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def interrupted_then_resumed(
    cfg: RunConfig, monkeypatch: Any, console: Any, at: int = 4, before_resume: Any = None
) -> None:
    """Train ``cfg`` until step ``at`` starts (a KeyboardInterrupt there), call ``before_resume()`` if given,
    then resume from the newest checkpoint to the end."""
    import pytest

    from qlora_cli.train import loop
    from qlora_cli.train.loop import run_train

    real = loop.train_step

    def stop(run, window):
        if run.state.step == at:
            raise KeyboardInterrupt
        return real(run, window)

    monkeypatch.setattr(loop, "train_step", stop)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, console=console)
    monkeypatch.setattr(loop, "train_step", real)
    if before_resume is not None:
        before_resume()
    run_train(cfg.model_copy(update={"resume_from_checkpoint": "auto"}), console=console)
