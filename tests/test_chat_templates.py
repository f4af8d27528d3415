"""Named chat templates render what each model family's own template renders, and stay prefix-stable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_cli.config import DatasetSpec, DataSettings
from qlora_cli.data.chat_templates import NAMES, TEMPLATES, canonical_name, check_chat_template, resolve_chat_template
from qlora_cli.data.pipeline import ALPACA_PROMPT, IGNORE_INDEX, Row, build_datasets, tokenize_row
from qlora_cli.errors import ConfigError
from qlora_cli.model.loading import load_tokenizer
from qlora_cli.testing.tiny import build_char_tokenizer

from .conftest import make_config, write_jsonl

FAMILY = json.loads((Path(__file__).parent / "fixtures" / "family_chat_templates.json").read_text())
WITH_SYSTEM = ["chatml", "llama3", "llama2", "qwen2.5", "phi3"]  # their own templates take a system message
NO_SYSTEM = ["gemma", "mistral"]  # theirs refuse one; ours puts it before the first user turn

SYSTEM = "You are terse."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?\nShow it."},
    {"role": "assistant", "content": "  6, since 3+3=6.  "},  # padding: some families trim, some keep it
]


def render(template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    tok = build_char_tokenizer(chat_template=template)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def system_in_first_user_turn(messages: list[dict]) -> list[dict]:
    """What the named gemma/mistral templates do with a system prompt, as a conversation their own take."""
    system, first, *rest = messages
    return [{"role": "user", "content": system["content"] + "\n\n" + first["content"]}, *rest]


def test_every_family_has_a_reference_template():
    assert set(NAMES) - set(FAMILY) == {"alpaca"}  # no model ships alpaca; it is tested against the row format


@pytest.mark.parametrize("name", WITH_SYSTEM)
def test_named_template_renders_like_the_family_own(name):
    own = FAMILY[name]["chat_template"]
    ours = resolve_chat_template(name)
    # phi3's own template ends a finished conversation with EOS; qlora appends that EOS itself (see below)
    eos = "</s>" if name == "phi3" else ""
    assert render(ours, CONVERSATION) + eos == render(own, CONVERSATION)
    assert render(ours, CONVERSATION[:4], True) == render(own, CONVERSATION[:4], True)
    assert render(ours, CONVERSATION[1:]) + eos == render(own, CONVERSATION[1:])  # and without a system prompt


@pytest.mark.parametrize("name", NO_SYSTEM)
def test_families_without_a_system_role_get_it_in_the_first_user_turn(name):
    own = FAMILY[name]["chat_template"]
    ours = resolve_chat_template(name)
    with pytest.raises(Exception, match="(?i)system|alternate"):
        render(own, CONVERSATION)  # why the named template has to decide
    assert render(ours, CONVERSATION) == render(own, system_in_first_user_turn(CONVERSATION))
    assert render(ours, CONVERSATION[:4], True) == render(own, system_in_first_user_turn(CONVERSATION[:4]), True)
    assert render(ours, CONVERSATION[1:]) == render(own, CONVERSATION[1:])
    assert SYSTEM in render(ours, CONVERSATION)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "mistral-v0.3"])
def test_named_templates_pass_the_prefix_check_and_mask_only_assistant_turns(name):
    tok = build_char_tokenizer(chat_template=resolve_chat_template(name))
    ex = tokenize_row(Row("row", {"messages": CONVERSATION}), "chat", tok, train_on_inputs=False)
    trained = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert "4" in trained and "6, since 3+3=6." in trained
    assert "What is" not in trained and "Show it" not in trained and SYSTEM not in trained
    assert ex.labels[-1] == tok.eos_token_id and ex.n_targets >= len("4") + len("6, since 3+3=6.") + 1


@pytest.mark.parametrize("name", ["llama3", "chatml", "qwen2.5", "llama2"])
def test_named_template_gives_the_same_tokens_as_the_family_own(name):
    own = build_char_tokenizer(chat_template=FAMILY[name]["chat_template"])
    named = build_char_tokenizer(chat_template=resolve_chat_template(name))
    row = Row("row", {"messages": CONVERSATION})
    a, b = tokenize_row(row, "chat", own, False), tokenize_row(row, "chat", named, False)
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_phi3_tokens_equal_the_own_template_with_its_final_eos():
    tok = build_char_tokenizer(chat_template=resolve_chat_template("phi3"))
    ex = tokenize_row(Row("row", {"messages": CONVERSATION}), "chat", tok, False)
    own_text = render(FAMILY["phi3"]["chat_template"], CONVERSATION)
    assert ex.input_ids == tok(own_text, add_special_tokens=False)["input_ids"]


def test_alpaca_template_renders_the_alpaca_row_format():
    tok = build_char_tokenizer(chat_template=resolve_chat_template("alpaca"))
    chat = tokenize_row(
        Row("r", {"messages": [{"role": "user", "content": "Add 1+1"}, {"role": "assistant", "content": "2"}]}),
        "chat",
        tok,
        False,
    )
    alpaca = tokenize_row(Row("r", {"instruction": "Add 1+1", "output": "2"}), "alpaca", tok, False)
    assert chat.input_ids == alpaca.input_ids and chat.labels == alpaca.labels
    assert ALPACA_PROMPT.format(instruction="What is 2+2?") in render(
        resolve_chat_template("alpaca"), CONVERSATION[1:3]
    )
    with_system = render(resolve_chat_template("alpaca"), CONVERSATION[:3])
    assert with_system.startswith("<s>" + SYSTEM + "\n\n### Instruction:\n")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("llama3", "llama3"),
        ("qwen_25", "qwen2.5"),
        ("Qwen2.5", "qwen2.5"),
        ("phi_3", "phi3"),
        ("gemma2", "gemma"),
        ("tokenizer", None),
        ("tokenizer_default", None),
        (None, None),
    ],
)
def test_names_and_axolotl_spellings(given, stored):
    assert check_chat_template(given) == stored


def test_jinja_text_is_kept_and_names_are_not_jinja():
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert check_chat_template(jinja) == jinja and resolve_chat_template(jinja) == jinja
    assert canonical_name("llama3") == "llama3" and resolve_chat_template("llama3") == TEMPLATES["llama3"][0]
    assert resolve_chat_template("tokenizer") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("llama4", "unknown template name (use tokenizer for the tokenizer's own, one of chatml, llama3"),
        ("my template", "unknown template name"),
        ("{{ messages", "the Jinja template does not parse"),
    ],
)
def test_a_value_that_is_neither_a_name_nor_jinja_is_refused_at_validation(tmp_path, value, message):
    from qlora_cli.config import load_config

    with pytest.raises(ConfigError, match="key 'chat_template'") as e:
        load_config(None, base_model="x", datasets=[{"path": "d.jsonl"}], chat_template=value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_llama3_by_name_on_a_llama3_model_gives_the_tokens_of_its_own_template(tmp_path):
    """The bug this module exists for: `chat_template: llama3` must mean Llama-3's template."""
    folder = tmp_path / "tok"
    build_char_tokenizer(chat_template=FAMILY["llama3"]["chat_template"]).save_pretrained(folder)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    spec = DatasetSpec(path=str(data), type="chat")
    settings = DataSettings([spec], [], 0.0, False, 512, 0)

    def tokens(chat_template):
        cfg = make_config(tmp_path, data, tmp_path / "out", tokenizer=str(folder), chat_template=chat_template)
        built = build_datasets(settings, load_tokenizer(cfg))
        return [(e.input_ids, e.labels) for e in built.train]

    own, named = tokens(None), tokens("llama3")
    assert own == named and len(own) == 2
    assert sum(1 for t in own[0][1] if t != IGNORE_INDEX) > 10  # really trained on the answers, not on "llama3"


def test_a_named_template_whose_markers_are_not_tokens_is_warned_about(tmp_path, llama_dir):
    """Llama-3's template on a tokenizer without its header tokens would train on '<|eot_id|>' spelled out in
    pieces: untokenized_markers names them, qlora inspect data and qlora train say so; ChatML's markers are
    tokens of the tiny tokenizer, and the tokenizer's own template is never flagged."""
    from qlora_cli.data.chat_templates import marker_warning, untokenized_markers
    from qlora_cli.inspect.report import data_report
    from qlora_cli.testing.tiny import build_char_tokenizer
    from qlora_cli.train.loop import run_train
    from tests.conftest import make_config, write_jsonl

    tok = build_char_tokenizer()
    assert untokenized_markers("llama3", tok) == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert untokenized_markers("chatml", tok) == [] and untokenized_markers(None, tok) == []
    assert "<|eot_id|> are not tokens of this tokenizer" in marker_warning("llama3", tok)
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(8)]  # fmt: skip
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = make_config(llama_dir, data, tmp_path / "run", chat_template="llama3", max_steps=1,
                      datasets=[{"path": str(data), "type": "chat"}])  # fmt: skip
    assert any("<|start_header_id|>" in w and "spelled out in pieces" in w for w in data_report(cfg)["warnings"])
    from rich.console import Console

    console = Console(record=True, width=400)
    run_train(cfg, console=console)
    assert "warning: chat_template llama3: <|start_header_id|>" in console.export_text()
    ok = cfg.model_copy(update={"chat_template": "chatml", "output_dir": str(tmp_path / "ok")})
    console = Console(record=True, width=400)
    run_train(ok, console=console)
    assert "spelled out" not in console.export_text()


def test_adding_the_markers_as_special_tokens_makes_each_one_token_and_silences_the_warning(tmp_path, llama_dir):
    """The fix the warning offers: special_tokens with the markers; each is then one token whose row trains."""
    from qlora_cli.inspect.report import data_report
    from qlora_cli.model.loading import load_tokenizer
    from tests.conftest import make_config, write_jsonl

    markers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(8)]  # fmt: skip
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    kw = dict(chat_template="llama3", max_steps=1, datasets=[{"path": str(data), "type": "chat"}])
    warned = make_config(llama_dir, data, tmp_path / "a", **kw)
    assert any(f"special_tokens: {json.dumps(markers)}" in w for w in data_report(warned)["warnings"])
    fixed = make_config(llama_dir, data, tmp_path / "b", special_tokens=markers, **kw)
    assert not any("spelled out in pieces" in w for w in data_report(fixed)["warnings"])
    tok = load_tokenizer(fixed)
    ids = tok.apply_chat_template(rows[0]["messages"], tokenize=True)
    ids = list(ids["input_ids"]) if not isinstance(ids, list) else ids
    assert ids.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 2  # one token per turn end, not pieces


def test_mistral_v03_moves_the_system_prompt_to_the_last_user_turn_so_multi_turn_is_refused_in_one_line():
    """Mistral v0.3's own template puts the system prompt (and tools) before the last user turn: rendering one
    more turn changes earlier text (and drops the system prompt once an assistant turn ends the conversation), so
    the turns of such a conversation cannot be located (one line, never a wrong mask); without one they can."""
    from qlora_cli.errors import DataError

    tok = build_char_tokenizer(chat_template=resolve_chat_template("mistral-v0.3"))
    with pytest.raises(DataError, match="row: the chat template is not prefix-stable"):
        tokenize_row(Row("row", {"messages": CONVERSATION}), "chat", tok, train_on_inputs=False)
    ex = tokenize_row(Row("row", {"messages": CONVERSATION[1:]}), "chat", tok, train_on_inputs=False)
    trained = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert "4" in trained and "6, since 3+3=6." in trained and "What is" not in trained
