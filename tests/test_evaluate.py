"""`qlora eval`: loss with training's masking, greedy exact match, base beside adapters, and an independent judge.

One adapter is trained here on a task the rest of the suite never uses (shift every letter by one: "abc" ->
"bcd"); the judge scores it with its own code: PEFT loads the adapter, a plain argmax loop without KV cache
generates, strings are compared, and the loss is a hand-written log-softmax gather.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.data.pipeline import IGNORE_INDEX, Row
from qlora_cli.errors import ModelError
from qlora_cli.evaluate import EvalOptions, data_settings, evaluate, prepare, score_model
from qlora_cli.layout import METRICS_FILE
from qlora_cli.model.adapter_io import load_adapter
from qlora_cli.model.loading import load_base_model, load_tokenizer
from qlora_cli.model.lora import lora_disabled, lora_layers, set_fused
from qlora_cli.run_folder import open_run
from qlora_cli.scoring import generate_ids, generation_case
from qlora_cli.train.loop import run_train

from .conftest import make_config, upper_rows, write_jsonl

CPU = torch.device("cpu")


def shift_rows(n: int, seed: int) -> list[dict]:
    """The held-out task: shift every letter of a 3-5 letter word by one ("abc" -> "bcd")."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 5)))
        rows.append({"prompt": f"shift: {w}\nanswer: ", "completion": "".join(chr(ord(c) + 1) for c in w)})
    return rows


def summary(run_dir: str | Path) -> dict:
    lines = Path(run_dir, METRICS_FILE).read_text().splitlines()
    return [json.loads(x) for x in lines if json.loads(x)["type"] == "summary"][0]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and far faster on a busy machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(model_factory) -> Path:
    return model_factory("llama", initializer_range=0.1, seed=7)


@pytest.fixture(scope="module")
def task(tmp_path_factory, base_dir):
    """An adapter trained to solve the shift task (eval_datasets = the held-out words), and the held-out file."""
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("eval-task")
    train_rows = shift_rows(2000, seed=20)
    seen = {r["prompt"] for r in train_rows}
    held_out = [r for r in shift_rows(160, seed=21) if r["prompt"] not in seen][:100]
    data = write_jsonl(tmp / "train.jsonl", train_rows)
    held = write_jsonl(tmp / "held_out.jsonl", held_out)
    cfg = make_config(
        base_dir,
        data,
        tmp / "shift-run",
        eval_datasets=[{"path": str(held)}],
        max_steps=300,
        micro_batch_size=16,
        eval_batch_size=16,
        learning_rate=5e-3,
        lora_target_modules="all-linear",
        warmup_steps=10,
        logging_steps=100,
        save_steps=150,  # a mid-training checkpoint: an adapter that is right only part of the time
    )
    run_train(cfg, console=Console(quiet=True))
    return SimpleNamespace(run=Path(cfg.output_dir), held=held, rows=held_out, tmp=tmp, cfg=cfg)


@pytest.fixture(scope="module")
def short(tmp_path_factory, base_dir):
    """A second, briefly trained adapter on the same base; its eval data is a val_set_size split."""
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("eval-short")
    data = write_jsonl(tmp / "d.jsonl", upper_rows(40, seed=3))
    cfg = make_config(base_dir, data, tmp / "upper-run", max_steps=4, learning_rate=1e-2, val_set_size=0.25)
    run_train(cfg, console=Console(quiet=True))
    return SimpleNamespace(run=Path(cfg.output_dir), cfg=cfg, tmp=tmp)


def run_cli(*args: str):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and fragment in lines[-1], result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output


def hand_loss(model, examples) -> tuple[float, int]:
    """Mean next-token negative log-likelihood over target tokens, one unpadded example at a time, float64."""
    total, n = 0.0, 0
    for ex in examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]  # (T, V)
        logp = torch.log_softmax(logits.double(), dim=-1)
        for t in range(1, len(ex.input_ids)):
            if ex.labels[t] != IGNORE_INDEX:
                total -= float(logp[t - 1, ex.labels[t]])
                n += 1
    return total / n, n


# ---------------------------------------------------------------------------------------------
# loss


def test_loss_equals_an_independent_computation_in_every_format(task):
    run = open_run(task.run)
    model = load_base_model(run.model, CPU)
    load_adapter(model, run.path)
    model.eval()
    tok = load_tokenizer(run.model)
    w = [r["prompt"].split()[1] for r in task.rows[:3]]
    raw = [
        ({"prompt": "shift: abc\nanswer: ", "completion": "bcd"}, "completion"),
        ({"prompt": "shift: hij\nanswer: ", "completion": "ijk"}, "completion"),
        ({"instruction": "shift", "input": w[0], "output": "x"}, "alpaca"),
        ({"instruction": "shift the word", "output": "yz"}, "alpaca"),
        ({"messages": [{"role": "user", "content": w[1]}, {"role": "assistant", "content": "ok"}]}, "chat"),
        ({"text": f"some text {w[2]}"}, "text"),
    ]
    items = [(Row(f"rows:{i}", r), fmt) for i, (r, fmt) in enumerate(raw)]
    data = prepare(items, tok, data_settings(task.cfg, None), None)
    # the completion masking, rebuilt by hand: targets are exactly the completion and EOS
    ex = data.examples[0]
    prompt_ids = tok("shift: abc\nanswer: ")["input_ids"]
    assert ex.input_ids == prompt_ids + tok("bcd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + ex.input_ids[len(prompt_ids) :]

    score = score_model("x", model, tok, data, batch_size=4, max_new_tokens=4, device=CPU)  # padded batches
    expected, n = hand_loss(model, data.examples)
    assert score.n_tokens == n and score.n_examples == 6
    assert abs(score.loss - expected) < 1e-5, (score.loss, expected)
    assert math.isclose(score.perplexity, math.exp(score.loss), rel_tol=1e-12)
    assert score.predictions[5] is None and all(p is not None for p in score.predictions[:5])  # text: no answer


def test_train_time_eval_loss_equals_qlora_eval(task, short):
    """metrics.jsonl's final eval_loss is what `qlora eval` reports on the same eval data: eval_datasets,
    and the val_set_size split of the training data rebuilt exactly."""
    report = evaluate([task.run], EvalOptions(include_base=False, max_new_tokens=1))
    assert abs(report.models[0].loss - summary(task.run)["eval_loss"]) < 1e-5
    assert report.models[0].n_examples == len(task.rows)

    report = evaluate([short.run], EvalOptions(include_base=False, max_new_tokens=1))
    assert report.models[0].n_examples == 10  # 25% of 40 rows
    assert abs(report.models[0].loss - summary(short.run)["eval_loss"]) < 1e-5
    assert "val_set_size" in report.source


@pytest.mark.oldest
def test_bf16_run_matches_its_train_time_eval_loss(tmp_path, base_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(24, seed=5))
    cfg = make_config(
        base_dir, data, tmp_path / "bf16", max_steps=3, learning_rate=1e-2, bnb_4bit_compute_dtype="bfloat16",
        eval_datasets=[{"path": str(data)}],
    )  # fmt: skip
    run_train(cfg, console=quiet_console)
    report = evaluate([tmp_path / "bf16"], EvalOptions(include_base=False, max_new_tokens=2))
    assert abs(report.models[0].loss - summary(tmp_path / "bf16")["eval_loss"]) < 1e-5


def test_adapters_on_differently_loaded_bases_are_refused(task, tmp_path, base_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=5))
    cfg = make_config(base_dir, data, tmp_path / "bf16", max_steps=1, bnb_4bit_compute_dtype="bfloat16")
    run_train(cfg, console=quiet_console)
    with pytest.raises(ModelError, match="load their base differently"):
        evaluate([task.run, tmp_path / "bf16"], EvalOptions(data=str(data)))


# ---------------------------------------------------------------------------------------------
# generation


class Oracle(torch.nn.Module):
    """A stand-in model that answers each prompt with a fixed string and gives uniform logits."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.masks = tokenizer, answers, []
        self.generation_config = None

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(self.tok)))

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kw):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            self.masks.append(mask.tolist())
            prompt = self.tok.decode(ids[mask.bool()], skip_special_tokens=True)
            rows.append(ids.tolist() + self.tok(self.answers[prompt], add_special_tokens=False)["input_ids"])
        T = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (T - len(r)) for r in rows])


def test_exact_match_and_contains_on_a_model_with_known_answers(tokenizer):
    rows = [
        ({"prompt": "shift: abc\nanswer: ", "completion": "bcd"}, "bcd</s>junk after EOS"),  # exact (cut at EOS)
        ({"prompt": "shift: a long prompt xyz\nanswer: ", "completion": "yza"}, "  yza "),  # exact (whitespace)
        ({"prompt": "q: hij\nanswer: ", "completion": "ijk"}, "ijk and more"),  # contains only
        ({"prompt": "q: k\nanswer: ", "completion": "l"}, "nope"),  # wrong
    ]
    answers = {r["prompt"]: a for r, a in rows}
    items = [(Row(f"f:{i}", r), "completion") for i, (r, _) in enumerate(rows)] + [(Row("f:5", {"text": "t"}), "text")]
    data = prepare(items, tokenizer, data_settings(None, 512), None)
    oracle = Oracle(tokenizer, answers)
    score = score_model("oracle", oracle, tokenizer, data, batch_size=4, max_new_tokens=20, device=CPU)
    assert score.exact_match == 0.5 and score.contains == 0.75 and score.n_examples == 5
    assert score.predictions[0] == "bcd" and score.predictions[4] is None
    assert abs(score.loss - math.log(len(tokenizer))) < 1e-6  # uniform logits: loss log V, perplexity V
    assert abs(score.perplexity - len(tokenizer)) < 1e-3
    # prompts were left-padded: zeros, then ones, and the short ones did get padding
    assert all(m == sorted(m) for m in oracle.masks) and any(m[0] == 0 for m in oracle.masks)


def test_batched_generation_equals_one_by_one(task, tokenizer):
    """Left padding of very different prompt lengths, KV cache, the 4-bit base with and without the adapter."""
    run = open_run(task.run)
    model = load_base_model(run.model, CPU)
    load_adapter(model, run.path)
    rng = random.Random(3)
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in task.rows[:6]]
    prompts += [tokenizer("".join(rng.choice("abcdefghij \n") for _ in range(n)))["input_ids"] for n in (1, 7, 60, 90)]
    for fused in (False, True):  # the plain LoRA path and the fused one training uses (and eval, for a run)
        set_fused(model, fused)
        batched = generate_ids(model, tokenizer, prompts, max_new_tokens=8, batch_size=16)
        assert batched == [generate_ids(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
        assert any(len(b) == 8 for b in batched) and any(len(b) < 8 for b in batched)  # some stop at EOS, some not
    with lora_disabled(model):
        base = generate_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=5)
        assert base == [generate_ids(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]


# ---------------------------------------------------------------------------------------------
# the judge (the "done when")


def judge_generate(model, tok, prompt: str, reference: str) -> str:
    """Plain greedy decoding: the whole sequence through the model for every token, no cache, argmax."""
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    for _ in range(len(reference) + 8):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        text = tok.decode(out)
        if not reference.startswith(text.strip()) and not text.isspace():
            break  # already wrong: it can no longer equal the reference
    return tok.decode(out)


def judge_loss(model, tok, rows: list[dict]) -> float:
    """Mean NLL of completion + EOS given the prompt, every target token weighted the same."""
    total, n = 0.0, 0
    for r in rows:
        prompt = tok(r["prompt"])["input_ids"]
        target = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # row j predicts target[j]
        total -= float(logp[torch.arange(len(target)), torch.tensor(target)].sum())
        n += len(target)
    return total / n


def judge_model(base: str, adapter: Path | None):
    """The 4-bit base as transformers + bitsandbytes load it, with the adapter loaded by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    for module in model.modules():  # bitsandbytes' CPU inference kernel computes in bf16; the judge wants float32
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return (PeftModel.from_pretrained(model, adapter) if adapter is not None else model).eval()


def test_qlora_eval_agrees_with_an_independent_judge(task, tmp_path):
    """The base (~0%), a mid-training checkpoint and the final adapter (high): `qlora eval`'s exact match
    within 0.03 and loss within 1e-3 of the judge's."""
    from transformers import AutoTokenizer

    out = tmp_path / "results.json"
    checkpoint = task.run / "checkpoints" / "step-150"
    args = (task.run, checkpoint, "--data", task.held, "--type", "completion", "--json", out, "--samples", "3")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "shift-run" in result.stdout and "step-150" in result.stdout and "the change from the base" in result.stdout
    models = json.loads(out.read_text())["models"]
    assert [m["name"] for m in models] == ["base", "shift-run", "step-150"]
    for m in models:
        assert set(m) == {"name", "loss", "perplexity", "exact_match", "contains", "n_examples"}
        assert m["n_examples"] == len(task.rows) and math.isclose(m["perplexity"], math.exp(m["loss"]))

    tok = AutoTokenizer.from_pretrained(task.run)
    judged_em = {}
    for judged, adapter in zip(models, (None, task.run, checkpoint)):
        model = judge_model(task.cfg.base_model, adapter)
        preds = [judge_generate(model, tok, r["prompt"], r["completion"]) for r in task.rows]
        em = sum(p.strip() == r["completion"] for p, r in zip(preds, task.rows)) / len(task.rows)
        loss = judge_loss(model, tok, task.rows)
        name, judged_em[judged["name"]] = judged["name"], em
        print(f"{name}: exact match qlora {judged['exact_match']:.3f} judge {em:.3f}; loss qlora {judged['loss']:.6f} judge {loss:.6f}")  # fmt: skip
        assert abs(judged["exact_match"] - em) <= 0.03, (name, judged["exact_match"], em)
        assert abs(judged["loss"] - loss) < 1e-3, (name, judged["loss"], loss)
    assert judged_em["base"] <= 0.05 and judged_em["shift-run"] >= 0.8
    # the samples show prompt, reference and each model's answer
    first = task.rows[0]
    assert first["prompt"].split()[1] in result.stdout and repr(first["completion"]) in result.stdout


# ---------------------------------------------------------------------------------------------
# several models


def test_two_adapters_on_one_base_load_it_once(task, short, monkeypatch):
    import qlora_cli.model.loading as model_module

    calls = []
    real = model_module.load_base_model
    monkeypatch.setattr(model_module, "load_base_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    options = EvalOptions(data=str(task.held), limit=20)
    both = evaluate([task.run, short.run], options)
    assert len(calls) == 1
    assert [m.name for m in both.models] == ["base", "shift-run", "upper-run"]
    assert all(m.n_examples == 20 for m in both.models)
    alone = evaluate([short.run], options)  # the same numbers as evaluated alone: the base came back intact
    for a, b in zip(alone.models, [both.models[0], both.models[2]]):
        assert abs(a.loss - b.loss) < 1e-6 and a.exact_match == b.exact_match and a.predictions == b.predictions
    assert both.models[1].exact_match > 0.8 and both.models[0].exact_match == 0.0
    assert both.models[1].loss < both.models[0].loss - 2


def test_a_merged_model_folder_scores_like_its_adapter(tmp_path, base_dir, quiet_console):
    """A 16-bit run merged by hand into a plain model folder: same loss and answers as base + adapter."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(32, seed=6))
    cfg = make_config(base_dir, data, tmp_path / "run16", max_steps=4, learning_rate=2e-2, load_in_4bit=False)
    run_train(cfg, console=quiet_console)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    load_adapter(model, tmp_path / "run16")
    for name, layer in list(lora_layers(model)):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    model.save_pretrained(tmp_path / "merged")
    load_tokenizer(open_run(tmp_path / "run16").model).save_pretrained(tmp_path / "merged")

    report = evaluate([tmp_path / "run16", tmp_path / "merged"], EvalOptions(data=str(data), max_new_tokens=6))
    base, adapter, merged = report.models
    assert [m.name for m in report.models] == ["base", "run16", "merged"]
    assert abs(adapter.loss - merged.loss) < 1e-5 and adapter.loss < base.loss - 0.05
    assert adapter.predictions == merged.predictions


def test_qlora_merge_output_scores_like_the_adapter(task, tmp_path):
    """`qlora merge` (into the NF4-dequantized weights the adapter trained on), then `qlora eval` on the
    merged folder beside the adapter: the same loss and answers."""
    merged = tmp_path / "shift-merged"
    result = CliRunner().invoke(app, ["merge", str(task.run), "-o", str(merged), "--dtype", "float32", "--no-verify"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "r.json"
    result = run_cli(task.run, merged, "--data", task.held, "--limit", 30, "--no-base", "--json", out)
    assert result.exit_code == 0, result.output
    adapter, plain = json.loads(out.read_text())["models"]
    assert (adapter["name"], plain["name"]) == ("shift-run", "shift-merged") and plain["n_examples"] == 30
    assert abs(adapter["loss"] - plain["loss"]) < 1e-4 and abs(adapter["exact_match"] - plain["exact_match"]) <= 0.04


def test_chat_generation_stops_at_the_end_of_turn(task, tokenizer):
    from qlora_cli.model.loading import stop_token_ids

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[tokenizer.eos_token_id, 77]))
    assert stop_token_ids(model, tokenizer, chat=True) == [tokenizer.eos_token_id, 77, im_end]
    assert stop_token_ids(model, tokenizer, chat=False) == [tokenizer.eos_token_id, 77]
    row = Row("c:1", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    case = generation_case(row, "chat", tokenizer)
    assert tokenizer.decode(case.prompt_ids).endswith("<|im_start|>assistant\n") and case.reference == "yo"


# ---------------------------------------------------------------------------------------------
# errors: one line, exit code 2


def test_errors_are_one_line(task, short, tmp_path, model_factory):
    assert_user_error(run_cli(tmp_path / "nope"), "run folder not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_cli(empty), "neither a run/adapter folder")

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(short.run / name, bare / name)
    assert_user_error(run_cli(bare), "no eval data")
    moved_data = tmp_path / "moved-run"
    shutil.copytree(task.run, moved_data)
    (moved_data / "qlora_config.yaml").write_text(
        (task.run / "qlora_config.yaml").read_text().replace(str(task.held), "gone/held_out.jsonl")
    )
    assert_user_error(run_cli(moved_data), "eval_datasets of moved-run: dataset file not found: gone/held_out.jsonl")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    assert_user_error(
        run_cli(task.run, "--data", bad, "--type", "completion"), f"{bad}:2: row is missing field 'completion'"
    )
    assert_user_error(run_cli(task.run, "--data", bad), f"{bad}:2: row is missing field 'completion'")  # inferred type
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a"}])
    assert_user_error(run_cli(task.run, "--data", odd), "cannot tell the data format")
    assert_user_error(run_cli(task.run, "--data", task.held, "--type", "qa"), "--type must be one of")
    assert_user_error(run_cli(task.run, "--data", task.held, "--json", tmp_path / "no" / "r.json"), "does not exist")

    other = model_factory("llama", hidden=32, initializer_range=0.1)
    assert_user_error(run_cli(task.run, "--data", task.held, "--base", other), "does not fit the base model")

    moved = tmp_path / "moved"
    shutil.copytree(bare, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other)
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert_user_error(run_cli(task.run, moved, "--data", task.held), "different base models")
