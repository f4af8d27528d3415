from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.data.pipeline import Row
from qlora_cli.scoring import generation_case, score_generations

from .conftest import upper_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, base: Path, data: Path, **kw) -> Path:
    cfg = {
        "base_model": str(base),
        "datasets": [{"path": str(data), "type": "completion"}],
        "bnb_4bit_compute_dtype": "float32",
        "max_steps": 2,
        "micro_batch_size": 4,
        "logging_steps": 1,
        "gradient_checkpointing": False,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
    }
    cfg.update(kw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_user_error(result, fragment: str, out_dir: Path | None = None) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output
    if out_dir is not None:
        assert not out_dir.exists()


@pytest.fixture
def good(tmp_path, llama_dir):
    return tmp_path, llama_dir, write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))


def test_missing_config_and_bad_override(good):
    tmp_path, base, data = good
    assert_user_error(run_cli("train", str(tmp_path / "nope.yaml")), "config file not found")
    cfg = write_config(tmp_path, base, data)
    assert_user_error(run_cli("train", str(cfg), "--set", "lora_r=-1"), "'lora_r'", tmp_path / "run")


def test_set_overrides_reach_the_run(good):
    tmp_path, base, data = good
    cfg = write_config(tmp_path, base, data)
    result = run_cli("train", str(cfg), "--set", "max_steps=3", "--set", "lora_r=4")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "qlora_config.yaml").read_text())
    assert saved["max_steps"] == 3 and saved["lora_r"] == 4
    assert '"r": 4' in (tmp_path / "run" / "adapter_config.json").read_text()
    # a second run into the same folder needs --force
    assert_user_error(run_cli("train", str(cfg)), "exists and is not empty")
    assert run_cli("train", str(cfg), "--force").exit_code == 0


def test_debug_shows_the_traceback(good):
    tmp_path, base, data = good
    cfg = write_config(tmp_path, base, data, lora_r=0)
    result = run_cli("train", str(cfg), "--debug")
    assert result.exit_code != 0 and result.exception is not None


def test_held_out_task_solved_by_the_adapter_loaded_in_peft(tmp_path, model_factory):
    """Done-when: `qlora train` on a fresh tiny model; PEFT loads the adapter on the 4-bit base and solves
    held-out examples (>= 90% exact match) that the base gets wrong (0%)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    # mistral: a tiny qwen2 folder reloads as Qwen2Tokenizer, whose byte-level pre-tokenizer drops the
    # character vocabulary's whitespace (the task would still be learnable, but not the one written here)
    base = model_factory("mistral", initializer_range=0.1, seed=7)
    train_rows, held_out = upper_rows(2000, seed=10), upper_rows(60, seed=11)
    seen = {r["prompt"] for r in train_rows}
    held_out = [r for r in held_out if r["prompt"] not in seen]
    data = write_jsonl(tmp_path / "train.jsonl", train_rows)
    cfg = write_config(
        tmp_path,
        base,
        data,
        max_steps=600,
        micro_batch_size=16,
        learning_rate=5e-3,
        lora_target_modules="all-linear",
        lora_dropout=0.0,
        warmup_steps=10,
        logging_steps=50,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_cli", "train", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    tok = AutoTokenizer.from_pretrained(tmp_path / "run")
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    four_bit = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    cases = [generation_case(Row("r", r), "completion", tok) for r in held_out]
    before = score_generations(four_bit, tok, cases, max_new_tokens=8)
    peft_model = PeftModel.from_pretrained(four_bit, tmp_path / "run")
    after = score_generations(peft_model, tok, cases, max_new_tokens=8)
    assert before.exact_match == 0.0
    assert after.exact_match >= 0.9, list(zip(after.predictions[:5], [c.reference for c in cases[:5]]))


def test_the_process_ends_without_teardown_after_its_exit_handlers_and_output():
    """quick_exit: the exit handlers run, buffered output is flushed, the code is kept; under a profiler or with
    another thread alive the process ends the usual way (a profile is written, a thread finishes its work)."""
    script = (
        "import atexit, sys, threading, time\n"
        "from qlora_cli.cli import quick_exit\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "if sys.argv[1] == 'thread':\n"
        "    threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()\n"
        "print('buffered', end='')\n"
        "quick_exit(3)\n"
    )
    for mode, expected in (("plain", "bufferedhandler ran\n"), ("thread", "bufferedthread done\nhandler ran\n")):
        ran = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 3 and ran.stdout == expected, (mode, ran.stdout, ran.stderr)
    ran = subprocess.run([sys.executable, "-m", "qlora_cli", "train", "missing.yaml"], capture_output=True, text=True)
    assert ran.returncode == 2 and ran.stderr.startswith("error: config file not found"), ran.stderr
