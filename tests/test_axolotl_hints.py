"""Axolotl's keys and values get a hint naming the qlora way (one line, exit 2, nothing written)."""

from __future__ import annotations

from typing import get_args

import pytest

from qlora_cli.config import AXOLOTL_KEYS, AXOLOTL_VALUES, DatasetType, Optimizer, RunConfig, load_config
from qlora_cli.errors import ConfigError

from .conftest import upper_rows, write_jsonl
from .test_cli import assert_user_error, run_cli, write_config

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl"}]}


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("adapter", "qlora", "in qlora: load_in_4bit: true"),
        ("adapter", "lora", "in qlora: load_in_4bit: false"),
        ("lora_target_linear", True, "in qlora: lora_target_modules: all-linear"),
        ("wandb_watch", "gradients", "in qlora: report_to: [wandb] with wandb_project, wandb_entity and run_name; no"),
        ("wandb_name", "r16", "in qlora: run_name (the run's name in every tracker)"),
        (
            "mlflow_tracking_uri",
            "http://x",
            "in qlora: report_to: [mlflow] with MLFLOW_TRACKING_URI in the environment",
        ),
        ("bf16", "auto", "in qlora: bnb_4bit_compute_dtype: bfloat16"),
        ("fp16", True, "in qlora: bnb_4bit_compute_dtype: float16"),
        ("test_datasets", [{"path": "e.jsonl"}], "in qlora: eval_datasets"),
        ("flash_attention", True, "in qlora: attn_implementation: flash_attention_2"),
        ("peft_use_rslora", True, "in qlora: lora_use_rslora: true"),
        ("warmup_ratio", 0.1, "in qlora: warmup_steps"),
    ],
)
def test_an_axolotl_key_names_the_qlora_way(key, value, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, **BASE, **{key: value})
    assert f"unknown key '{key}' (Axolotl's key; {hint}" in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"optimizer": "adamw_bnb_8bit"}, "got 'adamw_bnb_8bit' (Axolotl's name; in qlora: optimizer: adamw_8bit)"),
        ({"datasets": [{"path": "d.jsonl", "type": "chat_template"}]}, "(Axolotl's name; in qlora: type: chat)"),
        ({"datasets": [{"path": "d.jsonl", "field_messages": "conv"}]}, "unknown key 'datasets.0.field_messages'"),
    ],
)
def test_axolotl_values_and_dataset_keys_get_hints(fields, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, **{**BASE, **fields})
    assert fragment in str(e.value), str(e.value)
    assert "Axolotl's" in str(e.value)


def test_hints_name_only_keys_qlora_has():
    """A hint that points at a key qlora does not have would be a second wrong turn."""
    for hint in AXOLOTL_KEYS.values():
        for text in hint.values() if isinstance(hint, dict) else [hint]:
            named = text.split(":")[0].split(" ")[0]
            assert named in RunConfig.model_fields or text.startswith(("nothing to set", "accelerate")), text
    assert len(AXOLOTL_KEYS) >= 15 and not set(AXOLOTL_KEYS) & set(RunConfig.model_fields)
    allowed = {"optimizer": get_args(Optimizer), "type": get_args(DatasetType)}
    for (key, _), value in AXOLOTL_VALUES.items():
        assert value.split(" ")[0] in allowed[key], (key, value)


def test_axolotl_completion_rows_are_pointed_at_type_text(tmp_path, llama_dir):
    """Axolotl's type: completion reads a text field; qlora's reads prompt and completion."""
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "a document"}])
    cfg = write_config(tmp_path, llama_dir, data)
    assert_user_error(run_cli("train", str(cfg)), "a row with a 'text' field is type: text", tmp_path / "run")


def test_axolotl_config_through_the_cli(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(4, seed=0))
    for key, value, hint in [
        ("adapter", "qlora", "load_in_4bit: true"),
        ("lora_target_linear", True, "lora_target_modules: all-linear"),
        ("optimizer", "adamw_bnb_8bit", "optimizer: adamw_8bit"),
    ]:
        cfg = write_config(tmp_path, llama_dir, data, **{key: value})
        assert_user_error(run_cli("train", str(cfg)), hint, tmp_path / "run")
