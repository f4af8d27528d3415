"""Data as people bring it now: tool calls, reasoning, which turns train, ShareGPT rows and weighted mixtures.
Token ids are compared with the tokenizer's own render of the same conversation (transformers'
``apply_chat_template``), and the targets are read back as text."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from qlora_cli.config import load_config
from qlora_cli.data.chat_templates import CHATML_TEMPLATE, QWEN25_TEMPLATE
from qlora_cli.data.examples import IGNORE_INDEX
from qlora_cli.data.pipeline import build_datasets, tokenize_rows
from qlora_cli.data.sources import Row, read_rows
from qlora_cli.errors import DataError
from qlora_cli.testing.tiny import build_char_tokenizer
from tests.conftest import make_config, write_jsonl
from tests.test_cli import assert_user_error, run_cli

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "rain, 12C"},
        {"role": "assistant", "content": "It rains."},
    ],
    "tools": TOOLS,
}
# a template with a place for reasoning (as Qwen3's and DeepSeek-R1's have), ChatML otherwise
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message.reasoning_content %}{{ '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _Settings:
    def __init__(self, **kw):
        self.sequence_len, self.train_on_inputs, self.num_proc = 4096, False, 1
        self.train_on, self.train_on_reasoning = kw.get("train_on", "all_assistant"), kw.get("reasoning", True)


def _example(fields, template=QWEN25_TEMPLATE, fmt="chat", **kw):
    tokenizer = build_char_tokenizer(chat_template=template)
    (ex,), _ = tokenize_rows([Row("d.jsonl:1", copy.deepcopy(fields))], fmt, tokenizer, _Settings(**kw))
    return ex, tokenizer


def _runs(ex, tokenizer) -> list[str]:
    """The target tokens as text, one string per contiguous run."""
    runs, current = [], []
    for t, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_a_tool_call_conversation_is_the_templates_own_render_and_trains_only_the_assistant_turns():
    ex, tokenizer = _example(TOOL_ROW)
    text = tokenizer.apply_chat_template(TOOL_ROW["messages"], tools=TOOLS, tokenize=False)
    own = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ex.input_ids == own + [tokenizer.eos_token_id]  # transformers' render, token for token, then EOS
    assert _runs(ex, tokenizer) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It rains.<|im_end|>",
        "</s>",  # EOS after the template's newline
    ]
    assert "get_weather" in text.split("<|im_end|>")[0]  # the schema was rendered in the system turn, untrained


def test_tool_call_arguments_as_a_json_string_and_the_flat_form_render_the_same():
    row = copy.deepcopy(TOOL_ROW)
    row["messages"][1]["tool_calls"] = [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert _example(row)[0].input_ids == _example(TOOL_ROW)[0].input_ids


def test_train_on_last_assistant_and_a_message_flag_choose_the_turns():
    ex, tokenizer = _example(TOOL_ROW, train_on="last_assistant")
    assert _runs(ex, tokenizer) == ["It rains.<|im_end|>", "</s>"]
    row = copy.deepcopy(TOOL_ROW)
    row["messages"][3]["train"] = False
    ex, tokenizer = _example(row)
    assert len(_runs(ex, tokenizer)) == 1 and "get_weather" in _runs(ex, tokenizer)[0]  # no EOS target either
    row["messages"][1]["train"] = False  # no turn left to train: the row is dropped (and counted)
    examples, stats = tokenize_rows([Row("d.jsonl:1", row)], "chat", tokenizer, _Settings())
    assert examples == [] and stats.dropped == 1


@pytest.mark.parametrize("template", [THINKING_TEMPLATE, CHATML_TEMPLATE])  # renders reasoning_content; does not
def test_reasoning_is_rendered_and_trained_or_left_out_by_the_switch(template):
    row = {
        "messages": [
            {"role": "user", "content": "Is it wet?"},
            {"role": "assistant", "content": "Yes.", "reasoning_content": "It rains in Paris."},
        ]
    }
    ex, tokenizer = _example(row, template)
    text = tokenizer.decode(ex.input_ids)
    assert "<think>\nIt rains in Paris.\n</think>\n\nYes." in text  # the template's place, or qlora's tags
    assert _runs(ex, tokenizer) == ["<think>\nIt rains in Paris.\n</think>\n\nYes.<|im_end|>", "</s>"]
    ex, tokenizer = _example(row, template, reasoning=False)
    assert tokenizer.decode(ex.input_ids) == text
    assert _runs(ex, tokenizer) == ["Yes.<|im_end|>", "</s>"]


def test_sharegpt_rows_with_llama_factory_tool_turns_and_a_role_map_equal_the_openai_shape(tmp_path):
    openai, tokenizer = _example(TOOL_ROW)
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "rain, 12C"},
            {"from": "bot", "value": "It rains."},
        ],
        "tools": json.dumps(TOOLS),
    }
    data = write_jsonl(tmp_path / "s.jsonl", [sharegpt])
    for roles in ({"bot": "assistant"}, {"assistant": ["bot", "gpt"]}):  # theirs -> ours, or Axolotl's form
        cfg = load_config(
            None, base_model="x", sequence_len=4096, datasets=[{"path": str(data), "type": "sharegpt", "roles": roles}]
        )
        rows = read_rows(cfg.datasets[0])
        (ex,), _ = tokenize_rows(rows, "sharegpt", tokenizer, cfg.data)
        assert ex.input_ids == openai.input_ids and ex.labels == openai.labels


def test_dataset_tools_apply_to_rows_without_their_own(tmp_path):
    row = {k: v for k, v in TOOL_ROW.items() if k != "tools"}
    data = write_jsonl(tmp_path / "t.jsonl", [row])
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    cfg = load_config(
        None,
        base_model="x",
        sequence_len=4096,
        datasets=[{"path": str(data), "type": "chat", "tools": str(tmp_path / "tools.json")}],
    )
    tokenizer = build_char_tokenizer(chat_template=QWEN25_TEMPLATE)
    (ex,), _ = tokenize_rows(read_rows(cfg.datasets[0]), "chat", tokenizer, cfg.data)
    assert ex.input_ids == _example(TOOL_ROW)[0].input_ids


def test_a_template_that_cannot_render_tools_is_refused_never_dropped():
    with pytest.raises(DataError, match="d.jsonl:1: the chat template does not render the tool definitions"):
        _example(TOOL_ROW, CHATML_TEMPLATE)
    row = {k: v for k, v in TOOL_ROW.items() if k != "tools"}
    with pytest.raises(DataError, match="does not render tool calls"):
        _example(row, CHATML_TEMPLATE)


def _train_yaml(tmp_path, base, datasets, **extra):
    config = {"base_model": str(base), "datasets": datasets, "output_dir": str(tmp_path / "o"), "device": "cpu",
              "bnb_4bit_compute_dtype": "float32", "chat_template": "qwen2.5", "max_steps": 2, **extra}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "c.yaml"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["messages"][0].update(role="robot"), "d.jsonl:2: messages[0]: unknown role 'robot'"),
        (
            lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city"),
            "d.jsonl:2: messages[1]: tool_calls[0]: arguments is not JSON",
        ),  # fmt: skip
        (lambda r: r["messages"][1]["tool_calls"][0]["function"].pop("name"), "tool_calls[0] has no function name"),
        (lambda r: r["messages"][2].update(tool_calls=[CALL]), "only assistant messages make tool calls"),
        (lambda r: r.update(tools=[{"type": "function"}]), "d.jsonl:2: tools[0] is not a function definition"),
    ],
)
def test_bad_conversations_are_one_line_errors_naming_file_and_line(tmp_path, llama_dir, change, message):
    bad = copy.deepcopy(TOOL_ROW)
    change(bad)
    data = write_jsonl(tmp_path / "d.jsonl", [TOOL_ROW, bad])
    res = run_cli("train", str(_train_yaml(tmp_path, llama_dir, [{"path": str(data), "type": "chat"}])))
    assert_user_error(res, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"weight": 0}], "greater than 0"),
        ([{"weight": 1}, {}], "a mixture gives every dataset a weight (or a count)"),
        ([{"count": 2}, {}], "a mixture gives every dataset a weight (or a count)"),
        ([{"count": 50}, {"count": 1}], "runs dry under the mixture: count 50"),
        ([{"weight": 1, "count": 2}], "a weight or a count, not both"),
    ],
)
def test_bad_mixtures_are_one_line_errors(tmp_path, llama_dir, entries, message):
    data = write_jsonl(tmp_path / "d.jsonl", [TOOL_ROW] * 8)
    datasets = [{"path": str(data), "type": "chat", **e} for e in entries]
    res = run_cli("train", str(_train_yaml(tmp_path, llama_dir, datasets)))
    assert_user_error(res, message)
    assert not (tmp_path / "o").exists()


def _qa(n: int, tag: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": f"{tag}{i}"}]}
            for i in range(n)]  # fmt: skip


def test_a_weighted_mixture_draws_in_proportion_the_same_every_time_and_inspect_shows_it(tmp_path, llama_dir):
    a = write_jsonl(tmp_path / "a.jsonl", _qa(40, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", _qa(20, "b"))
    c = write_jsonl(tmp_path / "c.jsonl", _qa(10, "c"))
    datasets = [{"path": str(a), "type": "chat", "weight": 3}, {"path": str(b), "type": "chat", "weight": 1},
                {"path": str(c), "type": "chat", "count": 4}]  # fmt: skip
    cfg = load_config(None, base_model=str(llama_dir), datasets=datasets, chat_template="chatml", seed=7)
    tokenizer = build_char_tokenizer()
    first = build_datasets(cfg.data, tokenizer)
    # a (40) runs out first at weight 3 of 4: 40 from a, 40 / 3 = 13 from b; c gives its count
    assert [(p.examples, p.drawn) for p in first.mixture] == [(40, 40), (20, 13), (10, 4)]
    drawn = [tokenizer.decode(e.input_ids) for e in first.train]
    assert len(drawn) == 57 and sum("<|im_start|>user\nb " in t for t in drawn) == 13
    again = build_datasets(cfg.data, tokenizer)
    assert [e.input_ids for e in again.train] == [e.input_ids for e in first.train]  # the same draw (and on resume)
    other = build_datasets(load_config(None, **{**cfg.model_dump(exclude_unset=True), "seed": 8}).data, tokenizer)
    assert [e.input_ids for e in other.train] != [e.input_ids for e in first.train]  # the seed picks the draw

    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"base_model": str(llama_dir), "datasets": datasets,
                                                     "chat_template": "chatml", "seed": 7}))  # fmt: skip
    res = run_cli("inspect", "data", str(tmp_path / "m.yaml"), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [p["drawn"] for p in report["mixture"]] == [40, 13, 4]
    assert report["mixture"][1]["tokens"] == sum(
        len(e.input_ids) for e in first.train if "b " in tokenizer.decode(e.input_ids)
    )
    assert report["train"]["examples"] == 57


def test_tool_call_data_trains_end_to_end_through_qlora_train(tmp_path, llama_dir):
    from rich.console import Console

    from qlora_cli.train.loop import run_train

    rows = []
    for city, weather in [("Paris", "rain"), ("Oslo", "snow"), ("Rome", "sun"), ("Lima", "fog")] * 4:
        row = copy.deepcopy(TOOL_ROW)
        row["messages"][0]["content"] = f"Weather in {city}?"
        row["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": city}
        row["messages"][2]["content"] = weather
        rows.append(row)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = make_config(llama_dir, data, tmp_path / "run", datasets=[{"path": str(data), "type": "chat"}],
                      chat_template="qwen2.5", max_steps=6, learning_rate=5e-3, micro_batch_size=8, sequence_len=2048)  # fmt: skip
    summary = run_train(cfg, console=Console(quiet=True))
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r.get("type") == "train"]  # fmt: skip
    assert summary is not None and len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1", "mistral-v0.3"])
def test_named_tool_templates_render_as_their_own_and_train_the_call_not_the_result(name):
    from qlora_cli.data.chat_templates import TEMPLATES

    row = copy.deepcopy(TOOL_ROW)
    row["messages"][1]["tool_calls"][0]["id"] = "call00001"  # Mistral's template needs 9-character ids
    row["messages"][2]["tool_call_id"] = "call00001"
    ex, tokenizer = _example(row, TEMPLATES[name][0])
    text = tokenizer.apply_chat_template(row["messages"], tools=TOOLS, tokenize=False)
    own = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[: len(own)] == own and len(ex.input_ids) - len(own) in (0, 1)
    runs = _runs(ex, tokenizer)
    assert (
        len(runs) in (2, 3)
        and "get_weather" in runs[0]
        and "Paris" in runs[0]
        and runs[1].lstrip().startswith("It rains.")
    )
    assert not any(s in r for r in runs for s in ("rain, 12C", "Weather in Paris", "Weather of a city"))


def test_tool_results_as_json_are_rendered_by_llama31_which_quotes_them():
    from qlora_cli.data.chat_templates import TEMPLATES

    row = copy.deepcopy(TOOL_ROW)
    row["messages"][2]["content"] = '{"temp": 12, "sky": "rain"}\nsecond line'
    ex, tokenizer = _example(row, TEMPLATES["llama3.1"][0])
    assert "second line" not in "".join(_runs(ex, tokenizer)) and "It rains." in "".join(_runs(ex, tokenizer))


def test_a_tool_name_in_the_user_text_does_not_pass_for_rendered_tools():
    row = copy.deepcopy(TOOL_ROW)
    row["messages"] = [{"role": "user", "content": "get_weather please"}, {"role": "assistant", "content": "No."}]
    with pytest.raises(DataError, match="does not render the tool definitions"):
        _example(row, CHATML_TEMPLATE)  # ChatML renders no tools, though the name appears in the user's text


def test_reasoning_that_the_answer_repeats_is_still_placed_and_masked():
    row = {"messages": [{"role": "user", "content": "Wet?"},
                        {"role": "assistant", "content": "Yes. It rains.", "reasoning_content": "Yes.\n\n"}]}  # fmt: skip
    ex, tokenizer = _example(row, CHATML_TEMPLATE, reasoning=False)
    assert "<think>\nYes.\n\n\n</think>\n\nYes. It rains." in tokenizer.decode(ex.input_ids)  # inlined, not skipped
    assert _runs(ex, tokenizer) == ["Yes. It rains.<|im_end|>", "</s>"]


def test_an_empty_tool_calls_list_is_no_call():
    row = {"messages": [{"role": "user", "content": "Hi", "tool_calls": []},
                        {"role": "assistant", "content": "Hello.", "tool_calls": []}]}  # fmt: skip
    ex, tokenizer = _example(row, CHATML_TEMPLATE)
    assert _runs(ex, tokenizer) == ["Hello.<|im_end|>", "</s>"]


def test_eval_prompts_read_sharegpt_rows_through_the_role_map(tmp_path):
    from qlora_cli.scoring import generation_case

    data = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "bot", "value": "Hello."}]}])  # fmt: skip
    cfg = load_config(
        None, base_model="x", datasets=[{"path": str(data), "type": "sharegpt", "roles": {"bot": "assistant"}}]
    )
    (row,) = read_rows(cfg.datasets[0])
    case = generation_case(row, "sharegpt", build_char_tokenizer())
    assert case.reference == "Hello." and build_char_tokenizer().decode(case.prompt_ids).endswith(
        "<|im_start|>assistant\n"
    )


def test_a_weighted_dataset_left_empty_is_an_error_not_a_one_example_mixture(tmp_path):
    long = write_jsonl(tmp_path / "l.jsonl", [{"messages": [{"role": "user", "content": "x" * 600},
                                                            {"role": "assistant", "content": "y"}]}])  # fmt: skip
    short = write_jsonl(tmp_path / "s.jsonl", _qa(10, "s"))
    datasets = [{"path": str(long), "type": "chat", "weight": 1}, {"path": str(short), "type": "chat", "weight": 1}]
    cfg = load_config(None, base_model="x", datasets=datasets, chat_template="chatml", sequence_len=64)
    with pytest.raises(DataError, match="l.jsonl has no training examples left, so its weight cannot be met"):
        build_datasets(cfg.data, build_char_tokenizer())


def test_a_mixture_redraws_each_epoch_in_the_same_proportions_and_resumes_bit_exact(tmp_path, llama_dir, monkeypatch):
    from rich.console import Console
    from safetensors.torch import load_file

    from qlora_cli.layout import ADAPTER_WEIGHTS
    from qlora_cli.train import loop
    from qlora_cli.train.loop import run_train
    from tests.conftest import interrupted_then_resumed

    a = write_jsonl(tmp_path / "a.jsonl", _qa(8, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", _qa(24, "b"))
    datasets = [{"path": str(a), "type": "chat", "weight": 1}, {"path": str(b), "type": "chat", "weight": 1}]
    kw = dict(datasets=datasets, chat_template="chatml", micro_batch_size=4, max_steps=12, save_steps=3,
              learning_rate=5e-3)  # fmt: skip
    seen: list[str] = []
    real = loop.train_step

    def record(run, window):
        seen.extend(e.row.where for batch in window for row in batch for e in row)
        return real(run, window)

    monkeypatch.setattr(loop, "train_step", record)
    quiet = Console(quiet=True)
    run_train(make_config(llama_dir, a, tmp_path / "straight", **kw), console=quiet)
    epochs = [seen[i : i + 16] for i in range(0, 48, 16)]  # 8 of a (it runs out first) and 8 of b per epoch
    for epoch in epochs:
        assert sum(str(a) in w for w in epoch) == 8 and sum(str(b) in w for w in epoch) == 8
    b_sets = [{w for w in epoch if str(b) in w} for epoch in epochs]
    assert b_sets[0] != b_sets[1] and b_sets[1] != b_sets[2]  # a new draw of b each epoch
    monkeypatch.setattr(loop, "train_step", real)
    interrupted_then_resumed(make_config(llama_dir, a, tmp_path / "resumed", **kw), monkeypatch, quiet, at=7)
    x, y = (
        load_file(str(tmp_path / "straight" / ADAPTER_WEIGHTS)),
        load_file(str(tmp_path / "resumed" / ADAPTER_WEIGHTS)),
    )
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_sharegpt_and_reasoning_rows_train_end_to_end_through_the_cli(tmp_path, llama_dir):
    rows = []
    for i in range(8):
        rows.append({"conversations": [{"from": "human", "value": f"Count to {i}"},
                                       {"from": "bot", "value": " ".join(map(str, range(i + 1))),
                                        "reasoning_content": f"start at 0, stop at {i}"}]})  # fmt: skip
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    config = {"base_model": str(llama_dir), "output_dir": str(tmp_path / "o"), "device": "cpu",
              "bnb_4bit_compute_dtype": "float32", "chat_template": "chatml", "max_steps": 2, "micro_batch_size": 4,
              "train_on_reasoning": False,
              "datasets": [{"path": str(data), "type": "sharegpt", "roles": {"assistant": ["bot"]}}]}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    res = run_cli("inspect", "data", str(tmp_path / "c.yaml"), "--json")
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)["examples"][0]
    trained = "".join(t for t, m in zip(shown["tokens"], shown["target_mask"]) if m)
    assert trained.startswith("0<|im_end|>") and "stop at" not in trained  # the answer trains, its reasoning not
    res = run_cli("train", str(tmp_path / "c.yaml"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()
