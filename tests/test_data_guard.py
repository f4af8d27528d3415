"""The guard against training on nonsense: data that renders degenerate stops train and inspect data with one
line (exit 2, nothing written), unless allow_degenerate_data is set."""

from __future__ import annotations

import pytest

from .conftest import upper_rows, write_jsonl
from .test_cli import assert_user_error, run_cli, write_config

ANSWERS = ["red", "green", "blue", "violet", "orange"]
CHATS = [
    {"messages": [{"role": "user", "content": f"colour number {i}?"}, {"role": "assistant", "content": a}]}
    for i, a in enumerate(ANSWERS)
]
USER_ONLY = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
CONSTANT = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'OK' }}{% endif %}{% endfor %}"
ANSWERS_ONLY = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"

CASES = {
    "no targets": (USER_ONLY, "every training example has fewer than 2 target tokens (at most 1, 5 examples)"),
    "all the same": (CONSTANT, "all 5 training examples are the same tokens ('OK</s>')"),
    "prompt lost": (ANSWERS_ONLY, "do not appear in the text the chat template renders"),
}


@pytest.fixture
def chat_data(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", CHATS)


@pytest.mark.parametrize("case", list(CASES))
def test_degenerate_chat_data_stops_train_and_inspect(tmp_path, llama_dir, chat_data, case):
    template, message = CASES[case]
    cfg = write_config(
        tmp_path, llama_dir, chat_data, datasets=[{"path": str(chat_data), "type": "chat"}], chat_template=template
    )
    assert_user_error(run_cli("train", str(cfg)), message, tmp_path / "run")
    assert_user_error(run_cli("train", str(cfg)), "set allow_degenerate_data: true to train anyway", tmp_path / "run")
    assert_user_error(run_cli("inspect", "data", str(cfg)), message, tmp_path / "run")
    allowed = run_cli("inspect", "data", str(cfg), "--set", "allow_degenerate_data=true")
    assert allowed.exit_code == 0, allowed.output


def test_identical_rows_are_refused_in_any_format(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "say hi: ", "completion": "hi"}] * 4)
    cfg = write_config(tmp_path, llama_dir, data)
    assert_user_error(run_cli("train", str(cfg)), "all 4 training examples are the same tokens", tmp_path / "run")


def test_the_override_trains(tmp_path, llama_dir, chat_data):
    cfg = write_config(
        tmp_path,
        llama_dir,
        chat_data,
        datasets=[{"path": str(chat_data), "type": "chat"}],
        chat_template=CONSTANT,
        max_steps=1,
    )
    result = run_cli("train", str(cfg), "--set", "allow_degenerate_data=true")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_normal_data_passes_the_guard(tmp_path, llama_dir, chat_data):
    completion = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    for data, kind, template in ((chat_data, "chat", "chatml"), (completion, "completion", None)):
        cfg = write_config(tmp_path, llama_dir, data, datasets=[{"path": str(data), "type": kind}])
        if template:
            cfg = write_config(
                tmp_path, llama_dir, data, datasets=[{"path": str(data), "type": kind}], chat_template=template
            )
        result = run_cli("inspect", "data", str(cfg))
        assert result.exit_code == 0, result.output
        if kind == "chat":
            assert "chat template: named chatml" in result.output


def test_inspect_data_says_which_template_and_where_from(tmp_path, llama_dir, chat_data):
    spec = [{"path": str(chat_data), "type": "chat"}]
    own = run_cli("inspect", "data", str(write_config(tmp_path, llama_dir, chat_data, datasets=spec)), "--json")
    named = run_cli(
        "inspect", "data", str(write_config(tmp_path, llama_dir, chat_data, datasets=spec, chat_template="qwen_25"))
    )
    jinja = run_cli(
        "inspect",
        "data",
        str(write_config(tmp_path, llama_dir, chat_data, datasets=spec, chat_template=ANSWERS_ONLY + "{{ '' }}")),
        "--set",
        "allow_degenerate_data=true",
    )
    assert own.exit_code == named.exit_code == jinja.exit_code == 0, (own.output, named.output, jinja.output)
    assert '"source": "the tokenizer\'s own"' in own.output
    assert "chat template: named qwen2.5 (qlora's copy of Qwen2.5-*-Instruct)" in named.output
    assert "chat template: a Jinja template from the config" in jinja.output
