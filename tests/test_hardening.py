"""Hardening of the CLI's inputs: configs and data files that used to hang, crash or be misread."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.config import load_config, parse_override
from qlora_cli.data.pipeline import read_rows
from qlora_cli.errors import ConfigError

from .conftest import upper_rows, write_jsonl

# 1.4 KB of YAML whose aliases expand to 9^8 = 43 million strings inside a key the config knows
BOMB = (
    "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
        for prev, name in zip([None, "a", "b", "c", "d", "e", "f"], "abcdefg")
    )
    + f"lora_target_modules: [{', '.join(['*g'] * 9)}]\n"
)


def config_text(tmp_path: Path, extra: str) -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(4, seed=1))
    path = tmp_path / "cfg.yaml"
    path.write_text(f"base_model: {tmp_path}/model\ndatasets:\n  - path: {data}\n    type: completion\n{extra}")
    return path


def test_an_alias_bomb_is_refused_within_a_second(tmp_path):
    assert len(BOMB) < 2000
    path = config_text(tmp_path, BOMB)
    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["inspect", "data", str(path)])
    assert time.monotonic() - t0 < 1.0
    assert result.exit_code == 2, result.output
    assert "alias" in result.output and "100,000" in result.output and "Traceback" not in result.output
    levels = ["&l0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 7)]
    with pytest.raises(ConfigError, match="--set lora_target_modules: YAML aliases expand"):
        parse_override("lora_target_modules=[" + ", ".join(levels) + "]")


def test_small_anchors_and_merge_keys_still_work(tmp_path):
    path = config_text(tmp_path, "targets: &t [q_proj, v_proj]\nlora_target_modules: *t\n")
    with pytest.raises(ConfigError, match="unknown key 'targets'"):  # the anchor is read; the extra key is not ours
        load_config(path)
    path = config_text(tmp_path, "lora_target_modules: &t [q_proj, v_proj]\neval_datasets: []\n")
    assert load_config(path).lora_target_modules == ["q_proj", "v_proj"]


def test_a_key_given_twice_is_refused_naming_the_lines(tmp_path):
    path = config_text(tmp_path, "learning_rate: 1.0e-4\nlora_r: 8\nlearning_rate: 2.0e-4\n")
    result = CliRunner().invoke(app, ["inspect", "data", str(path)])
    assert result.exit_code == 2
    assert "key 'learning_rate' is given twice (lines 5 and 7)" in result.output, result.output


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_data_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    rows = upper_rows(3, seed=2)
    text = "".join(__import__("json").dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = tmp_path / "d.jsonl"
    raw = text.encode(encoding)
    if encoding == "utf-16-be":
        raw = b"\xfe\xff" + raw
    path.write_bytes(raw)
    from qlora_cli.config import DatasetSpec

    assert [r.fields for r in read_rows(DatasetSpec(path=str(path), type="completion"))] == rows


def test_a_non_utf8_data_file_is_one_line_naming_it_and_utf16_without_a_mark_is_read(tmp_path):
    from qlora_cli.config import DatasetSpec
    from qlora_cli.errors import DataError

    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 text .*0xe9"):
        read_rows(DatasetSpec(path=str(path), type="completion"))
    for encoding in ("utf-16-le", "utf-16-be", "utf-32-le"):  # no byte-order mark: told by where the NULs are
        path = tmp_path / f"nobom-{encoding}.json"
        path.write_bytes('[{"prompt": "aé", "completion": "b"}]'.encode(encoding))
        assert read_rows(DatasetSpec(path=str(path), type="completion"))[0].fields["prompt"] == "aé"


def test_a_run_folder_works_from_any_directory(tmp_path, monkeypatch, llama_dir):
    """Relative base and data paths are recorded absolute, so merge/eval work from another directory; when the
    base has moved, the error says so and points at --base."""
    import shutil

    from rich.console import Console

    from qlora_cli.run_folder import open_run
    from qlora_cli.train.loop import run_train

    from .conftest import make_config

    work = tmp_path / "project"
    (work / "models").mkdir(parents=True)
    shutil.copytree(llama_dir, work / "models" / "tiny")
    write_jsonl(work / "train.jsonl", upper_rows(16, seed=3))
    monkeypatch.chdir(work)
    run_train(
        make_config(Path("models/tiny"), Path("train.jsonl"), Path("runs/x"), max_steps=2), console=Console(quiet=True)
    )
    saved = (work / "runs/x/qlora_config.yaml").read_text()
    assert "# base_model as given: models/tiny" in saved and f"base_model: {work}/models/tiny" in saved

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = open_run(work / "runs/x")
    assert run.model.base_model == str(work / "models/tiny") and run.config.datasets[0].path == str(
        work / "train.jsonl"
    )
    result = CliRunner().invoke(app, ["merge", str(work / "runs/x"), "-o", "merged", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "merged" / "config.json").exists()

    (work / "models/tiny").rename(work / "models/moved")
    result = CliRunner().invoke(app, ["merge", str(work / "runs/x"), "-o", "merged2"])
    assert result.exit_code == 2 and "is no longer there" in result.output and "--base" in result.output
    assert not (elsewhere / "merged2").exists()
    result = CliRunner().invoke(
        app, ["merge", str(work / "runs/x"), "-o", "merged2", "--no-verify", "--base", str(work / "models/moved")]
    )
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, llama_dir):
    """A finished 4-step run with checkpoints at steps 1, 2 and 3, and its config file."""
    from rich.console import Console

    from qlora_cli.config import dump_config
    from qlora_cli.train.loop import run_train

    from .conftest import make_config

    tmp = tmp_path_factory.mktemp("ckpt")
    data = write_jsonl(tmp / "d.jsonl", upper_rows(32, seed=4))
    cfg = make_config(llama_dir, data, tmp / "run", max_steps=4, save_steps=1, micro_batch_size=4)
    run_train(cfg, console=Console(quiet=True))
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(dump_config(cfg))
    return tmp / "run", cfg_path


SPOIL = {
    "zero-byte optimizer.pt": lambda ckpt: (ckpt / "optimizer.pt").write_bytes(b""),
    "truncated optimizer.pt": lambda ckpt: (ckpt / "optimizer.pt").write_bytes(
        (ckpt / "optimizer.pt").read_bytes()[:300]
    ),
    "garbage scheduler.pt": lambda ckpt: (ckpt / "scheduler.pt").write_bytes(b"PK\x03\x04 not really a zip"),
    "truncated trainer_state.json": lambda ckpt: (ckpt / "trainer_state.json").write_text('{"step": 3, "con'),
    "truncated adapter": lambda ckpt: (ckpt / "adapter_model.safetensors").write_bytes(
        (ckpt / "adapter_model.safetensors").read_bytes()[:100]
    ),
}


@pytest.mark.parametrize("spoil", list(SPOIL))
def test_a_damaged_checkpoint_is_one_line_and_auto_resume_falls_back(checkpointed_run, tmp_path, spoil):
    import shutil

    run, cfg_path = checkpointed_run
    work = tmp_path / "run"
    shutil.copytree(run, work)
    text = cfg_path.read_text().replace(f"output_dir: {run}", f"output_dir: {work}")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    newest = work / "checkpoints" / "step-3"
    SPOIL[spoil](newest)
    damaged = spoil.split()[-1]
    # the damaged one named explicitly: one line naming the file, exit 2, nothing changed
    before = (work / "adapter_model.safetensors").read_bytes()
    result = CliRunner().invoke(app, ["train", str(cfg), "--set", f"resume_from_checkpoint={newest}", "--force"])
    assert result.exit_code == 2, result.output
    assert damaged in result.output and "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert (work / "adapter_model.safetensors").read_bytes() == before
    # auto: says it skips it and resumes from step 2
    result = CliRunner().invoke(app, ["train", str(cfg), "--resume", "--set", "max_steps=4"])
    assert result.exit_code == 0, result.output
    assert "skipping checkpoint" in result.output and damaged in result.output
    assert "at step 2" in result.output


def test_a_truncated_final_adapter_is_one_line_in_every_command(checkpointed_run, tmp_path):
    import shutil

    run, _ = checkpointed_run
    work = tmp_path / "run"
    shutil.copytree(run, work)
    weights = work / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:120])
    for args in (
        ["eval", str(work), "--no-base", "--limit", "2"],
        ["merge", str(work), "-o", str(tmp_path / "m")],
        ["generate", str(work), "-p", "upper: abc\nanswer: ", "--max-tokens", "2"],
        ["serve", "--adapter", f"x={work}", "--port", "0"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "adapter_model.safetensors cannot be read" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_one_line(tmp_path, llama_dir, seed):
    """set_seed seeds NumPy, whose seeds are 0 .. 2**32-1: -1 was a traceback after the checks had passed."""
    from .test_cli import assert_user_error, run_cli, write_config

    cfg = write_config(tmp_path, llama_dir, write_jsonl(tmp_path / "d.jsonl", upper_rows(4, seed=1)))
    assert_user_error(run_cli("train", str(cfg), "--set", f"seed={seed}"), "'seed'", tmp_path / "run")
