from __future__ import annotations

import pytest
import yaml

from qlora_cli.config import RunConfig, dump_config, load_config, parse_override, parse_size
from qlora_cli.errors import ConfigError

MIN = {"base_model": "m", "datasets": [{"path": "d.jsonl"}]}


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def error_of(tmp_path, data, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data), overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_match_the_documented_keys(tmp_path):
    cfg = load_config(write(tmp_path, MIN))
    assert (cfg.load_in_4bit, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert (cfg.optimizer, cfg.lr_scheduler, cfg.learning_rate) == ("paged_adamw_8bit", "cosine", 2e-4)
    assert cfg.datasets[0].type == "completion"
    assert cfg.lora.scaling == 2.0


def test_rslora_scaling(tmp_path):
    cfg = load_config(write(tmp_path, {**MIN, "lora_r": 16, "lora_alpha": 32, "lora_use_rslora": True}))
    assert cfg.lora.scaling == pytest.approx(8.0)


def test_unknown_key_suggests_the_right_one(tmp_path):
    msg = error_of(tmp_path, {**MIN, "lora_rr": 8})
    assert "unknown key 'lora_rr'" in msg and "did you mean 'lora_r'" in msg


def test_unknown_key_inside_a_dataset_entry(tmp_path):
    msg = error_of(tmp_path, {**MIN, "datasets": [{"path": "d.jsonl", "typ": "chat"}]})
    assert "datasets.0.typ" in msg and "did you mean 'type'" in msg


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("lora_r", 0, "greater than 0"),
        ("lora_r", "abc", "valid integer"),
        ("lora_r", True, "expected a number"),
        ("lora_alpha", -1, "greater than 0"),
        ("lora_dropout", 1.0, "less than 1"),
        ("lora_dropout", -0.1, "greater than or equal to 0"),
        ("sequence_len", 1, "greater than or equal to 2"),
        ("micro_batch_size", 0, "greater than or equal to 1"),
        ("lr_scheduler", "cosin", "'cosine', 'linear' or 'constant'"),
        ("optimizer", "sgd", "'paged_adamw_8bit'"),
        ("bnb_4bit_compute_dtype", "fp8", "'bfloat16', 'float16' or 'float32'"),
        ("learning_rate", ".inf", "finite"),
    ],
)
def test_wrong_types_and_ranges_name_the_key(tmp_path, key, value, expect):
    if value == ".inf":
        text = yaml.safe_dump(MIN) + f"{key}: .inf\n"
        msg = error_of(tmp_path, text)
    else:
        msg = error_of(tmp_path, {**MIN, key: value})
    assert f"'{key}'" in msg and expect in msg


def test_missing_required_key(tmp_path):
    assert "missing required key 'base_model'" in error_of(tmp_path, {"datasets": [{"path": "d"}]})


def test_yaml_syntax_error_names_the_line(tmp_path):
    msg = error_of(tmp_path, "base_model: m\ndatasets: [\n  {path: x\nlora_r: 4\n")
    assert "invalid YAML at line" in msg


def test_python_tags_are_refused(tmp_path):
    msg = error_of(tmp_path, "base_model: !!python/object/apply:os.system ['echo hi']\n")
    assert "invalid YAML" in msg


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, ""))


def test_overrides_parse_as_yaml_and_numbers(tmp_path):
    cfg = load_config(
        write(tmp_path, MIN),
        [
            "learning_rate=1e-4",
            "max_steps=50",
            "lora_target_modules=all-linear",
            "eval_steps=null",
            "datasets=[{path: x.csv, type: text}]",
        ],
    )
    assert cfg.learning_rate == 1e-4 and cfg.max_steps == 50 and cfg.lora_target_modules == "all-linear"
    assert cfg.eval_steps is None and cfg.datasets[0].path == "x.csv" and cfg.datasets[0].type == "text"
    assert parse_override("a=b=c") == ("a", "b=c")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, MIN), ["learning_rate"])
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'"):
        load_config(write(tmp_path, MIN), ["learning_rat=1"])


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    # PyYAML reads `2e-4` (no dot) as a string; users mean a number.
    cfg = load_config(write(tmp_path, yaml.safe_dump(MIN) + "learning_rate: 2e-4\n"))
    assert cfg.learning_rate == 2e-4


def test_a_single_target_string_is_one_suffix(tmp_path):
    assert load_config(write(tmp_path, {**MIN, "lora_target_modules": "q_proj"})).lora_target_modules == ["q_proj"]
    assert "at least one" in error_of(tmp_path, {**MIN, "lora_target_modules": []})


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {**MIN, "lora_r": 8, "eval_datasets": [{"path": "e.jsonl", "type": "chat"}]}))
    again = RunConfig(**yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_config(path)
        assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"


def test_one_reading_of_sizes_for_every_flag():
    """transformers' units, as the README states them for --max-shard-size: GB is 10**9, GiB 2**30; --gpu-memory
    reads sizes the same way."""
    assert parse_size("2GB", "s") == 2 * 10**9 == parse_size("2g", "s") and parse_size("500MB", "s") == 500 * 10**6
    assert parse_size("1GiB", "s") == 2**30 == parse_size("1 gib", "s") and parse_size("16384MiB", "s") == 16 * 2**30
    assert parse_size("64kb", "s") == 64_000 and parse_size(1234, "s") == 1234 and parse_size("1.5KiB", "s") == 1536
    for bad in ("lots", "-1GB", "0", "1iB"):
        with pytest.raises(ConfigError, match="--max-shard-size"):
            parse_size(bad, "--max-shard-size")
