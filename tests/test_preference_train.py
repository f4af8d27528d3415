"""Preference tuning through ``qlora train``: every method learns, resumes bit-exact, checkpoints and logs its
rewards; configs and rows that cannot work are one ``error:`` line with nothing written."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_cli.data.pipeline import IGNORE_INDEX
from qlora_cli.data.preference import tokenize_preference_rows
from qlora_cli.data.sources import Row
from qlora_cli.layout import ADAPTER_WEIGHTS, METRICS_FILE
from qlora_cli.train.loop import run_train
from tests.conftest import make_config, upper_rows, write_jsonl
from tests.test_cli import assert_user_error, run_cli


def pair_rows(n: int, seed: int) -> list[dict]:
    """Prefer the upper-cased word over the reversed one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 5)))
        rows.append({"prompt": f"upper: {w}\nanswer: ", "chosen": w.upper(), "rejected": w[::-1]})
    return rows


def unpaired_rows(n: int, seed: int) -> list[dict]:
    out = []
    for i, r in enumerate(pair_rows(n, seed)):
        good = i % 2 == 0
        out.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good})
    return out


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("prefs")
    return {
        "pairs": write_jsonl(folder / "pairs.jsonl", pair_rows(48, 0)),
        "eval": write_jsonl(folder / "eval.jsonl", pair_rows(16, 1)),
        "unpaired": write_jsonl(folder / "unpaired.jsonl", unpaired_rows(48, 2)),
    }


def pref_config(llama_dir, pref_data, out, method, **kw):
    kind = "unpaired" if method == "kto" and kw.pop("unpaired", True) else "preference"
    data = pref_data["unpaired" if kind == "unpaired" else "pairs"]
    fields = dict(
        method=method,
        datasets=[{"path": str(data), "type": kind}],
        eval_datasets=[{"path": str(pref_data["eval"]), "type": "preference"}] if method != "kto" else [],
        micro_batch_size=4,
        learning_rate=2e-3,
        lora_target_modules="all-linear",
        max_steps=12,
    )
    fields.update(kw)
    return make_config(llama_dir, data, out, **fields)


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / METRICS_FILE).read_text().splitlines()) if r["type"] == kind]


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_each_method_learns_and_logs_its_rewards(tmp_path, llama_dir, pref_data, quiet_console, method):
    out = tmp_path / method
    cfg = pref_config(llama_dir, pref_data, out, method, eval_steps=6 if method != "kto" else None)
    result = run_train(cfg, console=quiet_console)
    train = records(out, "train")
    assert len(train) == 12 and all(math.isfinite(r["loss"]) for r in train)
    logged = {k for r in train for k in r}  # a KTO step may hold responses of one label only
    assert {"rewards/chosen", "rewards/rejected"} <= logged
    first, last = sum(r["loss"] for r in train[:3]), sum(r["loss"] for r in train[-3:])
    assert last < first, (method, [r["loss"] for r in train])
    if method == "dpo":  # the reference is the base: the adapter's rewards start at 0 and separate
        assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference at step 1
        assert train[-1]["rewards/margin"] > 0 and train[-1]["rewards/accuracy"] >= 0.75
    if method == "orpo":
        assert {"nll", "log_odds_ratio"} <= set(train[0])
    if method == "kto":
        assert "kl" in train[0] and all(r["kl"] >= 0 for r in train)
    if method != "kto":
        evals = records(out, "eval")
        assert [e["step"] for e in evals] == [6, 12]
        assert evals[-1]["eval_rewards/accuracy"] > evals[0]["eval_rewards/accuracy"] - 1e-9
        assert result.eval_loss == pytest.approx(evals[-1]["eval_loss"])
    weights = load_file(str(out / ADAPTER_WEIGHTS))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_resume_is_bit_exact(tmp_path, llama_dir, pref_data, quiet_console, monkeypatch, method):
    kw = dict(max_steps=8, save_steps=4, gradient_accumulation_steps=2, lora_dropout=0.1)
    straight = tmp_path / "straight"
    run_train(pref_config(llama_dir, pref_data, straight, method, **kw), console=quiet_console)
    resumed = tmp_path / "resumed"
    cfg = pref_config(llama_dir, pref_data, resumed, method, **kw)
    from qlora_cli.train import loop

    real_step = loop.train_step

    def interrupt(run, window):
        if run.state.step == 5:
            raise KeyboardInterrupt
        return real_step(run, window)

    monkeypatch.setattr(loop, "train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, console=quiet_console)
    monkeypatch.setattr(loop, "train_step", real_step)
    run_train(cfg.model_copy(update={"resume_from_checkpoint": "auto"}), console=quiet_console)
    a, b = load_file(str(straight / ADAPTER_WEIGHTS)), load_file(str(resumed / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in records(straight, "train")]
    assert [r["loss"] for r in records(resumed, "train")] == losses


def test_precomputed_reference_trains_the_same(tmp_path, llama_dir, pref_data, quiet_console):
    runs = {}
    for pre in (False, True):
        out = tmp_path / str(pre)
        run_train(
            pref_config(llama_dir, pref_data, out, "dpo", precompute_ref_log_probs=pre, max_steps=6),
            console=quiet_console,
        )
        runs[pre] = [r["loss"] for r in records(out, "train")]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-6)


def test_ref_adapter_is_the_start_and_the_reference(tmp_path, llama_dir, pref_data, quiet_console):
    """DPO on top of an SFT run: the policy starts as the SFT adapter and the reference is that adapter, so the
    first step's loss is log 2 and its rewards 0 exactly, though the adapter is far from zero."""
    sft = tmp_path / "sft"
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows(32, 5)]
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    run_train(
        make_config(llama_dir, data, sft, lora_target_modules="all-linear", learning_rate=5e-3, max_steps=6),
        console=quiet_console,
    )
    out = tmp_path / "dpo"
    cfg = pref_config(llama_dir, pref_data, out, "dpo", ref_adapter=str(sft), max_steps=1, learning_rate=1e-9)
    run_train(cfg, console=quiet_console)
    first = records(out, "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    start, after = load_file(str(sft / ADAPTER_WEIGHTS)), load_file(str(out / ADAPTER_WEIGHTS))
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)
    assert max(float(v.abs().max()) for k, v in start.items() if "lora_B" in k) > 1e-3


def test_chat_pairs_train_only_the_response(tokenizer):
    """Conversational rows: the tokens are the template's own render of prompt + response, the targets only
    the response's assistant turn (and its end marker)."""
    row = Row(
        "p.jsonl:1",
        {
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        },
    )
    (ex,), stats = tokenize_preference_rows([row], "preference", tokenizer, 512)
    for e, text in ((ex, "hello"), (ex.rejected, "go away")):
        messages = row.fields["prompt"] + [{"role": "assistant", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert e.input_ids[: len(ids)] == ids
        prompt = tokenizer.apply_chat_template(row.fields["prompt"], tokenize=False, add_generation_prompt=True)
        assert e.prompt_len == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        trained = tokenizer.decode([t for t in e.labels if t != IGNORE_INDEX])
        assert trained.startswith(text + "<|im_end|>"), trained
    # a string prompt is framed as a user turn
    plain = Row("p.jsonl:2", {"prompt": "hi", "chosen": "hello", "rejected": "go away"})
    (ex2,), _ = tokenize_preference_rows([plain], "preference", tokenizer, 512)
    assert tokenizer.decode(ex2.input_ids).startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello")


def test_the_prompt_is_cut_before_the_responses():
    long_prompt = "p" * 40
    row = Row("p.jsonl:1", {"prompt": long_prompt, "chosen": "x" * 10, "rejected": "y" * 6})
    from qlora_cli.testing.tiny import build_char_tokenizer

    tok = build_char_tokenizer(chat_template=None)  # plain text, one token per character
    (ex,), stats = tokenize_preference_rows([row], "preference", tok, 32)
    assert stats.truncated == 1
    # the chosen response (10 chars + EOS) is whole; the prompt kept its last 32 - 11 = 21 tokens
    assert len(ex.input_ids) == 32 and ex.prompt_len == 21
    assert tok.decode(ex.input_ids[ex.prompt_len :]) == "x" * 10 + "</s>"
    assert ex.rejected.prompt_len == 21 and ex.rejected.input_ids[:21] == ex.input_ids[:21]
    # a response longer than the whole length: the prompt keeps half, the response its start
    row = Row("p.jsonl:2", {"prompt": long_prompt, "chosen": "x" * 50, "rejected": "y"})
    (ex,), stats = tokenize_preference_rows([row], "preference", tok, 32)
    assert ex.prompt_len == 16 and len(ex.input_ids) == 32 and len(ex.rejected.input_ids) == 16 + 2


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"prompt": "a", "chosen": "b"}, "bad.jsonl:2: row is missing field 'rejected'"),
        ({"prompt": "a", "chosen": "same", "rejected": "same"}, "bad.jsonl:2: 'chosen' and 'rejected' are the same"),
        ({"prompt": "a", "chosen": "  ", "rejected": "b"}, "bad.jsonl:2: field 'chosen' is an empty response"),
        (
            {
                "prompt": "a",
                "chosen": [{"role": "user", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "y"}],
            },
            "field 'chosen' has no assistant message",
        ),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, llama_dir, row, fragment):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    cfg = _yaml(tmp_path, llama_dir, data, method="dpo", kind="preference")
    assert_user_error(run_cli("train", str(cfg)), fragment, tmp_path / "run")


def test_kto_label_must_be_a_boolean(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}])
    cfg = _yaml(tmp_path, llama_dir, data, method="kto", kind="unpaired")
    assert_user_error(run_cli("train", str(cfg)), "bad.jsonl:1: field 'label' must be true", tmp_path / "run")


def _yaml(tmp_path, base, data, method="dpo", kind="preference", **kw) -> Path:
    cfg = {
        "base_model": str(base),
        "datasets": [{"path": str(data), "type": kind}],
        "method": method,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "max_steps": 1,
    }
    cfg.update(kw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "method, kind, kw, fragment",
    [
        ("dpo", "completion", {}, "method dpo trains on type: preference rows, got completion"),
        ("sft", "preference", {}, "preference rows are preference data; set method: dpo, orpo or kto"),
        ("dpo", "preference", {"beta": 0}, "key 'beta': input should be greater than 0"),
        ("dpo", "preference", {"beta": 1000}, "key 'beta': input should be less than or equal to 100"),
        ("orpo", "preference", {"beta": 0.2}, "key 'beta': does not apply to method: orpo"),
        ("dpo", "preference", {"orpo_alpha": 0.2}, "key 'orpo_alpha': applies to method: orpo, not dpo"),
        ("kto", "unpaired", {"micro_batch_size": 1}, "key 'micro_batch_size': KTO needs at least 2"),
        ("dpo", "preference", {"sample_packing": True}, "key 'sample_packing': not with method: dpo"),
        ("dpo", "preference", {"dpo_loss": "ipo", "label_smoothing": 0.1}, "label_smoothing': applies to dpo_loss"),
        ("dpo", "preference", {"rl": "dpo"}, "unknown key 'rl' (Axolotl's key; in qlora: method"),
        ("dpo", "preference", {"loss_type": "ipo"}, "unknown key 'loss_type' (TRL's key; in qlora: dpo_loss"),
    ],
)
def test_config_errors_are_one_line(tmp_path, llama_dir, pref_data, method, kind, kw, fragment):
    data = pref_data["unpaired" if kind == "unpaired" else "pairs"]
    cfg = _yaml(tmp_path, llama_dir, data, method=method, kind=kind, **kw)
    assert_user_error(run_cli("train", str(cfg)), fragment, tmp_path / "run")


def test_a_ref_adapter_that_does_not_fit_is_refused(tmp_path, llama_dir, model_factory, pref_data, quiet_console):
    other = model_factory("llama", initializer_range=0.1, layers=1, hidden=32)  # other shapes
    sft_data = write_jsonl(tmp_path / "sft.jsonl", upper_rows(8, 0))
    run_train(
        make_config(other, sft_data, tmp_path / "other", max_steps=1, lora_r=16, lora_alpha=32), console=quiet_console
    )
    cfg = _yaml(tmp_path, llama_dir, pref_data["pairs"], ref_adapter=str(tmp_path / "other"), lora_r=16, lora_alpha=32)
    result = run_cli("train", str(cfg))
    assert_user_error(result, "ref_adapter", tmp_path / "run")
    cfg = _yaml(tmp_path, llama_dir, pref_data["pairs"], ref_adapter=str(tmp_path / "other"), lora_r=8)
    assert_user_error(run_cli("train", str(cfg)), "has lora_r 16", tmp_path / "run")


def test_eval_reports_rewards_against_the_reference_beside_the_base(tmp_path, llama_dir, pref_data, quiet_console):
    """qlora eval on preference data: the adapter's reward accuracy and margin against its reference are the
    ones training logged for the same eval pairs; the base gets the share of pairs it already prefers."""
    out = tmp_path / "dpo"
    run_train(pref_config(llama_dir, pref_data, out, "dpo", max_steps=8), console=quiet_console)
    logged = records(out, "eval")[-1]
    report = tmp_path / "eval.json"
    result = run_cli("eval", str(out), "--data", str(pref_data["eval"]), "--json", str(report), "--device", "cpu")
    assert result.exit_code == 0, result.output
    base, adapter = json.loads(report.read_text())["models"]
    assert base["name"] == "base" and "reward_accuracy" not in base and 0 <= base["prefers_chosen"] <= 1
    assert adapter["reward_accuracy"] == pytest.approx(logged["eval_rewards/accuracy"])
    assert adapter["reward_margin"] == pytest.approx(logged["eval_rewards/margin"], rel=1e-4)
    assert adapter["prefers_chosen"] > base["prefers_chosen"]
    assert adapter["n_examples"] == 16  # loss and exact match over prompt + chosen response


def test_the_memory_plan_counts_both_responses_of_a_pair(tmp_path):
    """A DPO micro-batch of B pairs runs 2B sequences: its step peak is the SFT plan's at twice the batch, and the
    largest micro-batch that fits about half (Llama-3.1-8B's shapes, 24 GiB)."""
    from qlora_cli.memory_plan import plan_memory
    from qlora_cli.testing.tiny import save_llama_8b_shapes

    folder = save_llama_8b_shapes(tmp_path / "8b")
    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4, 0))
    kw = dict(bnb_4bit_compute_dtype="bfloat16", lora_target_modules="all-linear", sequence_len=1024)
    kw.update(gradient_checkpointing=True, device="auto")
    sft = make_config(folder, data, tmp_path / "run", micro_batch_size=2, **kw)
    dpo = make_config(
        folder, data, tmp_path / "run", micro_batch_size=1, method="dpo",
        datasets=[{"path": str(data), "type": "preference"}], **kw,
    )  # fmt: skip
    p_sft = plan_memory(sft, device_type="cuda", gpu_memory=24 * 2**30)
    p_dpo = plan_memory(dpo, device_type="cuda", gpu_memory=24 * 2**30)
    assert p_dpo.tensor_peak == p_sft.tensor_peak
    half = p_sft.max_micro_batch_size / 2  # the search extrapolates from each plan's own batch: near, not equal
    assert 0.8 * half <= p_dpo.max_micro_batch_size <= half + 1, (p_dpo.max_micro_batch_size, half)


def test_inspect_data_shows_both_responses_of_a_pair_with_their_targets(tmp_path, llama_dir, pref_data):
    from qlora_cli.inspect.report import data_report

    cfg = pref_config(llama_dir, pref_data, tmp_path / "run", "dpo")
    report = data_report(cfg, n_examples=2)
    shown = report["examples"]
    assert [e["where"].rsplit(" ", 1)[1] for e in shown] == ["(chosen)", "(rejected)"] * 2
    first = pair_rows(48, 0)[0]
    for view, text in ((shown[0], first["chosen"]), (shown[1], first["rejected"])):
        trained = "".join(t for t, m in zip(view["tokens"], view["target_mask"]) if m)
        assert trained == text + "<|im_end|></s>"  # the assistant turn and EOS, never the prompt
    assert report["train"]["examples"] == 48 and report["train"]["truncated"] == 0


def test_two_processes_equal_one_with_twice_the_accumulation(tmp_path, llama_dir, pref_data):
    """DPO under DDP (two gloo processes on the CPU): every pair weighs the same whatever the process layout,
    so the losses, rewards and adapter equal one process with twice the accumulation."""
    from tests.test_scale import ROOT, launch, write_cfg

    common = dict(
        base_model=str(llama_dir),
        method="dpo",
        datasets=[{"path": str(pref_data["pairs"]), "type": "preference"}],
        bnb_4bit_compute_dtype="float32",
        micro_batch_size=3,
        max_steps=3,
        lora_dropout=0.1,
        optimizer="adamw_torch",
        learning_rate=2e-3,
        lora_target_modules="all-linear",
        logging_steps=1,
        gradient_checkpointing=False,
        device="cpu",
    )
    one = write_cfg(tmp_path / "one.yaml", **common, gradient_accumulation_steps=4, output_dir=str(tmp_path / "one"))
    two = write_cfg(tmp_path / "two.yaml", **common, gradient_accumulation_steps=2, output_dir=str(tmp_path / "two"))
    import subprocess
    import sys

    ran = subprocess.run(
        [sys.executable, "-m", "qlora_cli", "train", str(one)], cwd=ROOT, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    ran = launch(two, 2)
    assert ran.returncode == 0, ran.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "two" / ADAPTER_WEIGHTS))
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    ra, rb = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    assert [r["step"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"):
            assert abs(x[key] - y[key]) < 1e-5, (key, x[key], y[key])


def test_loss_png_of_a_preference_run_has_the_reward_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from qlora_cli.plot import make_figure, read_curves

    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step in range(1, 7):
        lines.append({"type": "train", "step": step, "loss": 0.7 - 0.1 * step, "lr": 1e-4, "grad_norm": 1.0,
                      "rewards/margin": 0.1 * step, "rewards/accuracy": min(1.0, 0.5 + 0.1 * step)})  # fmt: skip
    lines.append(
        {"type": "eval", "step": 6, "eval_loss": 0.2, "eval_rewards/margin": 0.5, "eval_rewards/accuracy": 0.9}
    )
    (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    curves = read_curves(run)
    assert curves.margin == [(s, pytest.approx(0.1 * s)) for s in range(1, 7)]
    assert curves.eval_accuracy == [(6, 0.9)]
    fig = make_figure([curves])
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 6 and titles[4].startswith("reward margin") and titles[5].startswith("reward accuracy")
    margin = fig.axes[4].get_lines()
    assert [list(line.get_ydata()) for line in margin] == [pytest.approx([0.1 * s for s in range(1, 7)]), [0.5]]
    # a supervised run keeps the four panels
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / METRICS_FILE).write_text(json.dumps({"type": "train", "step": 1, "loss": 1.0, "lr": 1e-4}) + "\n")
    assert len(make_figure([read_curves(sft)]).axes) == 4


# ---------------------------------------------------------------------------------------------
# review fixes: each of these failed on the first version


def test_kto_kl_pairs_never_meet_their_own_prompt_when_another_is_at_hand(tokenizer):
    """A pair split for KTO puts two responses to one prompt side by side; the KL pair of each takes the
    response of a row with another prompt."""
    from qlora_cli.data.preference import unpair
    from qlora_cli.train.preference import mismatched

    examples, _ = tokenize_preference_rows(
        [Row(f"p:{i}", r) for i, r in enumerate(pair_rows(3, 0))], "preference", tokenizer, 512
    )
    flat = unpair(examples)  # [c0, r0, c1, r1, c2, r2]
    for e, kl in zip(flat, mismatched(flat, 512)):
        assert kl.input_ids[: kl.prompt_len] == e.input_ids[: e.prompt_len]
        response = kl.input_ids[kl.prompt_len :]
        owners = [o for o in flat if o.input_ids[o.prompt_len :] == response]
        assert owners and all(o.input_ids[: o.prompt_len] != e.input_ids[: e.prompt_len] for o in owners)


def test_kto_val_split_keeps_both_halves_of_a_pair_on_one_side(tokenizer, pref_data):
    from qlora_cli.config import DatasetSpec, DataSettings
    from qlora_cli.data.pipeline import build_datasets

    spec = DatasetSpec(path=str(pref_data["pairs"]), type="preference")
    settings = DataSettings([spec], [], 0.25, False, 512, 0, unpaired=True)
    data = build_datasets(settings, tokenizer)
    assert len(data.train) == 2 * 36 and len(data.eval) == 2 * 12
    train_rows = {e.row.where for e in data.train}
    assert not train_rows & {e.row.where for e in data.eval}
    assert data.train_stats.examples == 72 and data.eval_stats.examples == 24


def test_a_string_prompt_beside_whole_conversations_is_not_repeated(tokenizer):
    """UltraFeedback's shape: a string prompt and chosen/rejected conversations that start with it."""
    q = "what is two plus two?"
    convo = lambda a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    given = Row("u:1", {"prompt": q, "chosen": convo("4"), "rejected": convo("5")})
    implicit = Row("u:2", {"chosen": convo("4"), "rejected": convo("5")})
    (a,), _ = tokenize_preference_rows([given], "preference", tokenizer, 512)
    (b,), _ = tokenize_preference_rows([implicit], "preference", tokenizer, 512)
    assert a.input_ids == b.input_ids and tokenizer.decode(a.input_ids).count(q) == 1


def test_a_template_that_refuses_a_row_is_one_error_line(tmp_path):
    from qlora_cli.errors import DataError
    from qlora_cli.testing.tiny import build_char_tokenizer

    tok = build_char_tokenizer(chat_template="{{ raise_exception('Conversation roles must alternate') }}")
    row = Row("bad.jsonl:3", {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
                             "rejected": [{"role": "assistant", "content": "c"}]})  # fmt: skip
    with pytest.raises(
        DataError, match=r"bad.jsonl:3 \(chosen\): the chat template cannot render this row \(Conversation roles"
    ):
        tokenize_preference_rows([row], "preference", tok, 512)


def test_kto_refuses_an_eval_batch_of_one(tmp_path, llama_dir, pref_data):
    cfg = _yaml(tmp_path, llama_dir, pref_data["unpaired"], method="kto", kind="unpaired", eval_batch_size=1)
    assert_user_error(run_cli("train", str(cfg)), "key 'eval_batch_size': KTO needs at least 2", tmp_path / "run")


def test_preference_tuning_under_fsdp_is_refused(tmp_path, llama_dir, pref_data):
    from qlora_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="key 'fsdp': not with method: dpo yet"):  # its reference runs unsharded
        pref_config(llama_dir, pref_data, tmp_path / "run", "dpo", fsdp=True, bnb_4bit_quant_storage="float32")
    assert not (tmp_path / "run").exists()


def test_an_accelerate_fsdp_config_is_refused_in_one_line(tmp_path, llama_dir, pref_data, monkeypatch, quiet_console):
    from qlora_cli.errors import ConfigError
    from qlora_cli.train import loop

    monkeypatch.setattr(loop, "_is_fsdp", lambda accelerator: True)  # as `accelerate launch` with an FSDP config
    with pytest.raises(ConfigError, match="qlora shards with FSDP2 itself; set fsdp: true"):
        run_train(pref_config(llama_dir, pref_data, tmp_path / "run", "dpo"), console=quiet_console)
    assert not (tmp_path / "run").exists()


def test_ref_adapter_is_recorded_absolute(tmp_path, llama_dir, pref_data, monkeypatch):
    from qlora_cli.config import dump_config

    (tmp_path / "sft").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = pref_config(llama_dir, pref_data, tmp_path / "run", "dpo", ref_adapter="sft")
    assert yaml.safe_load(dump_config(cfg))["ref_adapter"] == str(tmp_path / "sft")


def test_trackers_get_the_rewards():
    from qlora_cli.train.trackers import tracker_values

    train = tracker_values({"type": "train", "step": 3, "loss": 0.5, "rewards/margin": 1.5, "kl": 0.2})
    assert train == {"train/loss": 0.5, "train/rewards/margin": 1.5, "train/kl": 0.2}
    assert tracker_values({"type": "eval", "step": 3, "eval_rewards/accuracy": 0.75}) == {"eval/rewards/accuracy": 0.75}


def test_eval_reads_unpaired_rows_and_needs_a_template_for_conversations():
    from qlora_cli.errors import DataError
    from qlora_cli.evaluate import FORMATS, as_chosen, infer_format
    from qlora_cli.testing.tiny import build_char_tokenizer

    assert "unpaired" in FORMATS
    assert infer_format(Row("k:1", {"prompt": "a", "completion": "b", "label": False})) == "unpaired"
    assert as_chosen(Row("k:1", {"prompt": "a", "completion": "b", "label": False}), build_char_tokenizer()) == (
        None,
        "",
    )
    convo = Row("c:1", {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
                        "rejected": [{"role": "assistant", "content": "c"}]})  # fmt: skip
    with pytest.raises(DataError, match="c:1: conversational preference rows need a chat template"):
        as_chosen(convo, build_char_tokenizer(chat_template=None))


def test_a_dpo_run_merges_and_passes_the_self_check(tmp_path, llama_dir, pref_data, quiet_console):
    """A preference run folder is a normal run folder: merge reads prompts from its pairs and reproduces it."""
    from qlora_cli.merge import run_merge

    run = tmp_path / "dpo"
    run_train(pref_config(llama_dir, pref_data, run, "dpo", max_steps=4), console=quiet_console)
    result = run_merge(run, tmp_path / "merged", device="cpu", console=quiet_console)
    check = result.check
    assert check is not None and check.prompts_from == "eval data" and check.n_prompts > 0
    assert check.adapter_kl > 0  # the adapter changes the model, and the merged model keeps that change
    assert check.problems == [] and check.mean_kl < 0.01 * check.adapter_kl  # within the self-check's 16-bit limits


def test_fused_token_log_probs_equal_the_plain_path(llama_dir, tokenizer):
    """The chunked head + per-token log-probabilities (kernels.cross_entropy.fused_linear_token_logps) give the
    plain log-softmax's values and LoRA gradients."""
    from qlora_cli.data.pipeline import collate
    from qlora_cli.model.loading import load_base_model
    from qlora_cli.model.lora import inject_lora, lora_layers, lora_parameters
    from qlora_cli.train.preference import token_logps

    cfg = make_config(llama_dir, Path("unused.jsonl"), Path("unused"), lora_target_modules="all-linear")  # not run
    torch.manual_seed(0)
    model = load_base_model(cfg, torch.device("cpu"))
    inject_lora(model, cfg.lora)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.weight.normal_(0, 0.05)
    examples, _ = tokenize_preference_rows(
        [Row(f"p:{i}", r) for i, r in enumerate(pair_rows(4, 3))], "preference", tokenizer, 512
    )
    batch = collate(examples + [e.rejected for e in examples], tokenizer.pad_token_id)
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        logp = token_logps(model, batch, fused)
        (logp.sum(1) * torch.linspace(0.5, 1.5, logp.shape[0])).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in lora_parameters(model)]))
    (plain, plain_grads), (fused, fused_grads) = results
    mask = batch["labels"][:, 1:] != -100
    assert torch.equal(fused == 0, ~mask) and torch.allclose(fused, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_an_accelerate_deepspeed_config_is_refused_in_one_line(
    tmp_path, llama_dir, pref_data, monkeypatch, quiet_console
):
    from qlora_cli.errors import ConfigError
    from qlora_cli.train import loop

    monkeypatch.setattr(loop, "_is_deepspeed", lambda accelerator: True)  # as `accelerate launch --use_deepspeed`
    with pytest.raises(ConfigError, match="qlora does not run under DeepSpeed; for sharding set fsdp: true"):
        run_train(pref_config(llama_dir, pref_data, tmp_path / "run", "dpo"), console=quiet_console)
    assert not (tmp_path / "run").exists()
