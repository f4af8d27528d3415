"""qlora inspect: target tables, the memory plan against exact counts and measured CPU runs, the data report's
label marks, the adapter report and the vLLM serving check, and the command line."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.config import load_config
from qlora_cli.data.pipeline import IGNORE_INDEX, read_rows, tokenize_rows
from qlora_cli.errors import ConfigError
from qlora_cli.inspect.adapter import adapter_report, delta_norm, vllm_check
from qlora_cli.inspect.report import (
    TARGET_STYLE,
    config_report,
    data_report,
    left_out_table,
    render_tokens,
    target_table,
)
from qlora_cli.memory_plan import plan_memory
from qlora_cli.memory_plan.sizes import (
    adapter_shapes,
    load_model_config,
    meta_model,
    nf4_bytes,
    optimizer_state_bytes,
    resident_bytes,
    target_infos,
    weight_bytes,
)
from qlora_cli.memory_plan.tracer import trace_step, traced_peak
from qlora_cli.model.loading import load_base_model
from qlora_cli.model.lora import Conv1D, inject_lora, lora_delta, lora_parameters
from qlora_cli.testing.measure import measure_training_peak, measured_optimizer_bytes
from qlora_cli.testing.tiny import build_char_tokenizer, save_llama_8b_shapes

from .conftest import make_config, upper_rows, write_jsonl

GiB = 2**30


def cfg_for(base: Path, tmp: Path, **kw):
    data = tmp / "d.jsonl"
    if not data.exists():
        write_jsonl(data, upper_rows(16, seed=3))
    return make_config(base, data, tmp / "run", **kw)


# ---------------------------------------------------------------------------------------------
# targets


def independent_linear_count(folder: Path, targets) -> tuple[dict, dict, int]:
    """{suffix: (count, {(in, out)})} of the targeted and of the other linear layers, from a real model, and
    the adapter parameters at r=8."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    head = model.get_output_embeddings()
    chosen: dict[str, list] = {}
    other: dict[str, list] = {}
    params = 0
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        suffix = name.rsplit(".", 1)[-1]
        w = module.weight
        shape = (w.shape[0], w.shape[1]) if isinstance(module, Conv1D) else (w.shape[1], w.shape[0])
        hit = targets == "all-linear" or suffix in targets
        entry = (chosen if hit else other).setdefault(suffix, [0, set()])
        entry[0] += 1
        entry[1].add(shape)
        params += 8 * sum(shape) if hit else 0
    return {k: (c, s) for k, (c, s) in chosen.items()}, {k: (c, s) for k, (c, s) in other.items()}, params


@pytest.mark.parametrize(
    "arch,targets",
    [
        ("llama", "all-linear"),
        ("llama", ["q_proj", "v_proj"]),
        ("gpt2", "all-linear"),
        ("gpt2", ["c_attn"]),
        ("phi3", ["qkv_proj", "down_proj"]),
        ("opt", "all-linear"),
        ("opt", ["q_proj", "fc1"]),
    ],
)
def test_target_table_equals_a_count_over_named_modules(arch, targets, model_factory, tmp_path):
    folder = model_factory(arch)
    cfg = cfg_for(folder, tmp_path, lora_target_modules=targets, lora_r=8)
    model = meta_model(load_model_config(cfg), cfg)
    infos = target_infos(model, cfg)
    table = {row["suffix"]: (row["count"], {tuple(s) for s in row["shapes"]}) for row in target_table(infos, 8)}
    left = {row["suffix"]: (row["count"], {tuple(s) for s in row["shapes"]}) for row in left_out_table(model, infos)}
    head = left.pop("lm_head")  # the output head is listed apart, never targeted
    expected, expected_other, expected_params = independent_linear_count(folder, targets)
    assert table == expected
    assert left == expected_other
    assert head[0] == 1
    params = sum(r["adapter_params"] for r in target_table(infos, 8))
    assert params == expected_params


# ---------------------------------------------------------------------------------------------
# memory plan: exact components


@pytest.mark.parametrize(
    "arch,dtype,double_quant",
    [("llama", "float32", True), ("llama", "bfloat16", False), ("gpt2", "bfloat16", True), ("opt", "float32", True)],
)
def test_weight_bytes_equal_the_loaded_model(arch, dtype, double_quant, model_factory, tmp_path):
    folder = model_factory(arch)
    cfg = cfg_for(
        folder,
        tmp_path,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=double_quant,
        lora_target_modules="all-linear",
    )
    skeleton = meta_model(load_model_config(cfg), cfg)
    planned = weight_bytes(skeleton, cfg)
    model = load_base_model(cfg, torch.device("cpu"))
    assert planned.total == resident_bytes(model)  # packed weights + absmax/codes/offsets + 16-bit + float32 parts
    quantized = [m for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    assert sum(m.weight.numel() for m in quantized) == planned.quantized_4bit
    assert planned.params_quantized == sum(m.in_features * m.out_features for m in quantized)
    names = inject_lora(model, cfg.lora)
    infos = target_infos(skeleton, cfg)
    assert [t.name for t in infos] == names
    adapter = sum(p.numel() * p.element_size() for p in lora_parameters(model))
    assert sum(math.prod(s) for s in adapter_shapes(infos, cfg.lora_r)) * 4 == adapter


def test_nf4_constants_per_parameter():
    # 8-bit absmax per 64 values + float32 per 256 blocks: ~0.127 bit/param; float32 per 64 without: 0.5 bit/param
    n = 4096 * 14336
    packed, dq = nf4_bytes(n, True)
    _, plain = nf4_bytes(n, False)
    assert packed == n // 2
    assert 8 * dq / n == pytest.approx(8 / 64 + 32 / (64 * 256), rel=2e-3)  # + ~1 KiB of codes per weight
    assert 8 * plain / n == pytest.approx(0.5, rel=1e-3)


def test_optimizer_state_bytes_equal_the_state_after_one_step(llama_dir, tmp_path):
    from qlora_cli.train.loop import build_optimizer

    # r=64 on a 64-wide model: some adapter tensors have >= 4096 elements (8-bit state), others fewer (float32)
    cfg = cfg_for(llama_dir, tmp_path, lora_r=64, lora_target_modules="all-linear")
    model = load_base_model(cfg, torch.device("cpu"))
    inject_lora(model, cfg.lora)
    params = lora_parameters(model)
    assert {p.numel() >= 4096 for p in params} == {True, False}
    model(input_ids=torch.randint(3, 50, (2, 9))).logits.float().pow(2).mean().backward()
    infos = target_infos(meta_model(load_model_config(cfg), cfg), cfg)
    sizes = {}
    for name in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        opt = build_optimizer(cfg.model_copy(update={"optimizer": name}), params)
        opt.step()
        sizes[name] = measured_optimizer_bytes(opt)
        assert optimizer_state_bytes(name, adapter_shapes(infos, 64)) == sizes[name], name
    assert sizes["adamw_8bit"] < sizes["paged_adamw_32bit"] < sizes["adamw_torch"]


# ---------------------------------------------------------------------------------------------
# memory plan: the traced step against measured CPU runs


@pytest.fixture(scope="module")
def plan_model(tmp_path_factory):
    """Llama-shaped, small but with a real vocabulary size: logits, activations and weights all matter."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("plan-llama")
    tok = build_char_tokenizer()
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def full_length_rows(n: int, length: int) -> list[dict]:
    rng = random.Random(0)
    return [{"text": "".join(rng.choice("abcdefgh ") for _ in range(2 * length))} for _ in range(n)]


@pytest.mark.parametrize(
    "settings",
    [
        dict(
            bnb_4bit_compute_dtype="float32",
            gradient_checkpointing=False,
            optimizer="adamw_torch",
            lora_dropout=0.0,
            fused_lora=False,
            fused_cross_entropy=False,
        ),
        dict(bnb_4bit_compute_dtype="bfloat16", gradient_checkpointing=True, optimizer="adamw_8bit", lora_dropout=0.1),
    ],
    ids=["fp32-plain-adamw", "bf16-fused-checkpointing-8bit-dropout"],
)
def test_plan_predicts_measured_cpu_peak_within_15_percent(settings, plan_model, tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", full_length_rows(6, 64))
    cfg = load_config(
        None,
        base_model=str(plan_model),
        datasets=[{"path": str(data), "type": "text"}],
        sequence_len=64,
        micro_batch_size=2,
        max_steps=2,
        logging_steps=1,
        lora_target_modules="all-linear",
        device="cpu",
        output_dir=str(tmp_path / "run"),
        **settings,
    )
    plan = plan_memory(cfg)
    measured = measure_training_peak(cfg)
    resident = sum(c.bytes for c in plan.resident if c.key not in ("optimizer", "gradients"))
    assert resident == measured["resident"]  # weights, quant state and adapter: exact
    error = abs(plan.tensor_peak - measured["tensor_peak"]) / measured["tensor_peak"]
    print(f"plan {plan.tensor_peak:,} measured {measured['tensor_peak']:,} error {100 * error:.3f}%")
    assert error < 0.15
    assert {c.key for c in plan.step} >= {"activations", "logits_and_loss"}


def test_layer_extrapolation_equals_the_full_trace(plan_model, tmp_path):
    cfg = load_config(
        None, base_model=str(plan_model), datasets=[{"path": "x.jsonl"}], lora_target_modules="all-linear"
    )
    model_config = load_model_config(cfg)
    kw = dict(device_type="cuda", micro_batch_size=2, seq_len=48, gradient_checkpointing=True)
    full = trace_step(model_config, cfg, num_layers=3, **kw)
    one = trace_step(model_config, cfg, num_layers=1, **kw)
    extrapolated = traced_peak(model_config, cfg, **kw)  # from 1 and 2 layers
    assert extrapolated.peak == full.peak > one.peak
    assert extrapolated.by_tag == full.by_tag


@pytest.fixture(scope="module")
def llama_8b_folder(tmp_path_factory):
    """Llama-3.1-8B's shapes as a config.json + tokenizer, no weights."""
    return save_llama_8b_shapes(tmp_path_factory.mktemp("llama-8b-shapes"))


def test_real_shaped_config_report(llama_8b_folder, tmp_path):
    cfg = cfg_for(
        llama_8b_folder,
        tmp_path,
        bnb_4bit_compute_dtype="bfloat16",
        lora_target_modules="all-linear",
        lora_r=16,
        sequence_len=2048,
        micro_batch_size=2,
        gradient_checkpointing=True,
        optimizer="paged_adamw_8bit",
        device="auto",
    )
    report = config_report(cfg, gpu_memory=24 * GiB)
    assert report["total_params"] == 8_030_261_248
    assert report["trainable_params"] == 41_943_040  # r=16 on all 7 projections of 32 layers
    assert {r["suffix"]: r["count"] for r in report["targets"]} == {
        s: 32 for s in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    plan = report["memory"]
    parts = {c["key"]: c["bytes"] for c in plan["resident"]}
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert parts["weights_4bit"] == linear // 2
    assert parts["unquantized"] == 2 * 128256 * 4096 * 2  # embeddings and head, bfloat16
    assert parts["adapter"] == 41_943_040 * 4
    step = {c["key"]: c["bytes"] for c in plan["step"]}
    assert step.get("logits_and_loss", 0) < 2**30  # the fused loss never holds (B, T, V) float32 logits
    assert step["dequantized_weight"] == 2 * (4096 * 4096 + 4096 * 1024 + 2 * 14336 * 4096)  # one bf16 buffer per shape
    plain = cfg.model_copy(update={"fused_cross_entropy": False})
    kw = dict(device_type="cuda", micro_batch_size=2, seq_len=2048, gradient_checkpointing=True)
    unfused = traced_peak(load_model_config(cfg), plain, **kw)
    assert unfused.by_tag["logits and loss"] > 2 * 2 * 2048 * 128256 * 4  # float32 logits and their gradient
    assert unfused.peak > plan["tensor_peak"] - sum(parts.values())
    assert plan["activations_without_checkpointing"] > 3 * plan["activations_with_checkpointing"]
    assert plan["fits"] and plan["max_micro_batch_size"] >= 2
    assert plan["total"] == plan["tensor_peak"] + sum(c["bytes"] for c in plan["overhead"])


def test_data_report_marks_exactly_the_target_positions(llama_dir, tmp_path):
    completion = write_jsonl(tmp_path / "c.jsonl", upper_rows(5, seed=1))
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "HELLO" * (i + 1)}]}
            for i in range(3)
        ],
    )
    cfg = cfg_for(llama_dir, tmp_path, chat_template="chatml", sequence_len=40)
    cfg = cfg.model_copy(
        update={
            "datasets": load_config(
                None,
                base_model="x",
                datasets=[{"path": str(chat), "type": "chat"}, {"path": str(completion), "type": "completion"}],
            ).datasets
        }
    )
    report = data_report(cfg, n_examples=6)
    from qlora_cli.model.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    expected = []
    stats = []
    for spec in cfg.datasets:
        examples, s = tokenize_rows(read_rows(spec), spec.type, tokenizer, cfg.data)
        expected += examples
        stats.append(s)
    assert len(report["examples"]) == 6
    for view, ex in zip(report["examples"], expected):
        assert view["input_ids"] == ex.input_ids
        assert view["target_mask"] == [label != IGNORE_INDEX for label in ex.labels]
        assert 0 < sum(view["target_mask"]) < len(view["target_mask"])
        text = render_tokens(view["tokens"], view["target_mask"])
        styled = Counter()
        for span in text.spans:
            styled[str(span.style)] += span.end - span.start
        assert styled[TARGET_STYLE] == sum(
            len(t.replace("\n", "↵\n")) for t, m in zip(view["tokens"], view["target_mask"]) if m
        )
    for entry, s in zip(report["datasets"], stats):
        assert (entry["examples"], entry["tokens"], entry["target_tokens"], entry["truncated"], entry["dropped"]) == (
            s.examples,
            s.tokens,
            s.target_tokens,
            s.truncated,
            s.dropped,
        )
    assert sum(h["count"] for h in report["histogram"]) == 8
    json.dumps(report)


def test_rendered_tokens_bracket_the_targets_without_colour():
    text = render_tokens(
        ["<s>", "a", "\n", "B", "C", "</s>", "x"], [False, False, False, True, True, True, False], True
    )
    assert text.plain == "<s>a↵\n⟦BC</s>⟧x"
    assert render_tokens(["a", "B"], [False, True], True).plain == "a⟦B⟧"


def test_data_report_warnings(tmp_path, model_factory):
    base = model_factory("llama")
    tok_dir = tmp_path / "tok"
    build_char_tokenizer(pad_is_eos=True, chat_template=None).save_pretrained(tok_dir)
    rows = upper_rows(4, seed=2) + [{"prompt": "p" * 40, "completion": "LONG"}]  # the last one: no target left
    completion = write_jsonl(tmp_path / "c.jsonl", rows)
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
    )
    cfg = load_config(
        None,
        base_model=str(base),
        tokenizer=str(tok_dir),
        datasets=[{"path": str(completion), "type": "completion"}, {"path": str(chat), "type": "chat"}],
        sequence_len=32,
    )
    report = data_report(cfg)
    text = " | ".join(report["warnings"])
    assert "pad token == EOS" in text
    assert "no chat template" in text and report["datasets"][1]["skipped"]
    assert "no target tokens" in text and report["datasets"][0]["dropped"] == 1
    assert "longer than sequence_len" in text
    short = data_report(cfg.model_copy(update={"sequence_len": 24, "datasets": cfg.datasets[:1]}))
    assert any("no EOS" in w for w in short["warnings"])  # truncated examples lose their EOS target


# ---------------------------------------------------------------------------------------------
# adapter report


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, llama_dir):
    from rich.console import Console

    from qlora_cli.train.loop import run_train

    tmp = tmp_path_factory.mktemp("inspect-run")
    data = write_jsonl(tmp / "d.jsonl", upper_rows(24, seed=1))
    cfg = make_config(
        llama_dir,
        data,
        tmp / "my-run",
        max_steps=2,
        learning_rate=1e-2,
        val_set_size=0.25,
        eval_steps=1,
        lora_target_modules=["q_proj", "v_proj", "down_proj"],
        lora_r=12,
        lora_alpha=24,
    )
    run_train(cfg, console=Console(quiet=True))
    return cfg


def test_adapter_report(trained_run):
    from qlora_cli.model.adapter_io import read_adapter

    out = Path(trained_run.output_dir)
    report = adapter_report(out)
    _, state = read_adapter(out)
    assert (report["r"], report["lora_alpha"], report["scaling"]) == (12, 24.0, 2.0)
    assert report["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert report["modules"] == len(state) // 2 == 6
    assert report["params"] == sum(t.numel() for t in state.values())
    for row in report["delta_norms"]:
        A, B = state[row["module"] + ".lora_A.weight"], state[row["module"] + ".lora_B.weight"]
        assert row["delta_norm"] == pytest.approx(float(torch.linalg.norm(lora_delta(A, B, 2.0))), rel=1e-5)
        assert row["delta_norm"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if r["type"] == "eval"]
    t = report["training"]
    assert t["steps"] == 2 and t["finished"] and len(evals) == 2
    assert t["best_eval_loss"] == min(evals) and t["final_eval_loss"] == evals[-1]
    s = report["serving"]
    assert s["ok"] and s["max_lora_rank"] == 16
    assert (
        s["command"]
        == f"vllm serve {trained_run.base_model} --enable-lora --lora-modules my-run={out} --max-lora-rank 16"
    )


def test_delta_norm_equals_the_dense_product():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 40, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)
    dense = (B @ A) * 0.7  # (out, in), float64
    assert delta_norm(A, B, 0.7) == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-12)
    assert delta_norm(A, B, -0.7) == delta_norm(A, B, 0.7) > 0


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"r": 600}, "above vLLM's largest"),
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"fan_in_fan_out": True}, "Conv1D"),
    ],
)
def test_vllm_check_refuses(change, problem):
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "bias": "none", **change}
    keys = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    result = vllm_check(config, keys, "base", Path("/runs/x"))
    assert not result["ok"] and problem in " ".join(result["problems"]) and result["command"] is None


def test_vllm_check_ranks_and_keys():
    keys = ["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    assert vllm_check({"r": 24}, keys, "b", Path("x"))["max_lora_rank"] == 32
    assert vllm_check({"r": 1}, keys, "b", Path("x"))["max_lora_rank"] == 1
    bad = vllm_check({"r": 8}, ["model.layers.0.q_proj.lora_A.default.weight"], "b", Path("x"))
    assert not bad["ok"] and "PEFT LoRA key" in bad["problems"][0]
    head = vllm_check({"r": 8}, ["base_model.model.lm_head.lora_A.weight"], "b", Path("x"))
    assert not head["ok"] and "lm_head" in head["problems"][0]


# ---------------------------------------------------------------------------------------------
# the command line


def run_cli(*args: str):
    return CliRunner().invoke(app, ["inspect", *args])


def write_yaml(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_cli_json_outputs_parse(trained_run, tmp_path):
    config = write_yaml(tmp_path / "cfg.yaml", trained_run)
    result = run_cli(str(config), "--json", "--gpu-memory", "1GB", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "config" and report["memory"]["fits"] and report["memory"]["max_micro_batch_size"] > 8
    data = json.loads(run_cli("data", str(config), "--json").stdout)
    assert data["kind"] == "data" and data["train"]["examples"] == 24
    adapter = json.loads(run_cli(trained_run.output_dir, "--json").stdout)
    assert adapter["kind"] == "adapter" and adapter["serving"]["ok"]
    text = run_cli(trained_run.output_dir)
    assert text.exit_code == 0 and "vllm serve" in text.stdout


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr


def test_cli_errors(trained_run, tmp_path):
    assert_one_line_error(run_cli(str(tmp_path / "missing.yaml")), "not found")
    assert_one_line_error(run_cli(str(tmp_path / "no-run-here")), "not found")
    assert_one_line_error(run_cli("data"), "usage: qlora inspect data")
    assert_one_line_error(run_cli("data", str(tmp_path / "missing.yaml")), "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**trained_run.model_dump(mode="json"), "lora_rr": 4}))
    assert_one_line_error(run_cli(str(bad)), "did you mean 'lora_r'")
    hub = tmp_path / "hub.yaml"
    hub.write_text(yaml.safe_dump({**trained_run.model_dump(mode="json"), "base_model": "nobody/not-cached-model"}))
    assert_one_line_error(run_cli(str(hub)), "not in the Hugging Face cache")
    target = tmp_path / "target.yaml"
    target.write_text(yaml.safe_dump({**trained_run.model_dump(mode="json"), "lora_target_modules": ["nope"]}))
    assert_one_line_error(run_cli(str(target)), "'nope' matches no module")
    not_adapter = tmp_path / "empty-folder"
    not_adapter.mkdir()
    assert_one_line_error(run_cli(str(not_adapter)), "not an adapter folder")
    assert_one_line_error(run_cli(str(bad), "--gpu-memory", "lots"), "--gpu-memory")


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("llama", {"modules_to_save": ["embed_tokens", "lm_head"], "special_tokens": ["<a>", "<b>"]}),
        ("gemma2", {"modules_to_save": ["embed_tokens"]}),  # tied: one copy
        ("llama", {"special_tokens": ["<a>", "<b>"], "trainable_token_indices": [5]}),
        ("llama", {"use_dora": True}),
    ],
)
def test_the_plan_counts_what_trains_beside_lora_as_the_run_holds_it(arch, extra, model_factory, tmp_path):
    """DoRA's magnitudes, whole embedding/head copies and new tokens' rows are in the adapter component and the
    optimizer state: the planned bytes equal the trained parameters of the model ``qlora train`` builds."""
    from qlora_cli.memory_plan import plan_memory
    from qlora_cli.model.loading import load_tokenizer
    from qlora_cli.model.token_rows import resize_for, row_parameters, token_ids, train_copies, train_rows

    folder = model_factory(arch)
    cfg = cfg_for(folder, tmp_path, bnb_4bit_compute_dtype="float32", **extra)
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg, torch.device("cpu"))
    before = model.get_input_embeddings().num_embeddings
    resize_for(model, len(tokenizer))
    inject_lora(model, cfg.lora)
    if cfg.modules_to_save:
        train_copies(model, cfg.modules_to_save)
    elif cfg.trains_rows:
        ids = token_ids(tokenizer, cfg.added_tokens) + cfg.trainable_token_indices
        train_rows(model, ids, set(ids[: len(cfg.added_tokens)]), before)
    trained = sum(p.numel() * 4 for p in lora_parameters(model) + row_parameters(model))
    plan = plan_memory(cfg, device_type="cpu", search_batch=False)
    assert next(c.bytes for c in plan.resident if c.key == "adapter") == trained


def test_the_plan_per_process_under_ddp_and_fsdp(llama_dir, tmp_path):
    """DDP: every process holds the whole plan plus gradient buckets; FSDP: the base, adapter and optimizer state
    sharded, one layer (and the embeddings) gathered whole; a 4-bit base FSDP cannot shard is one error line."""
    from qlora_cli.memory_plan import plan_memory

    fp32 = dict(bnb_4bit_compute_dtype="float32", bnb_4bit_quant_storage="float32", lora_target_modules="all-linear")
    cfg = cfg_for(llama_dir, tmp_path, **fp32, optimizer="adamw_torch")
    one = plan_memory(cfg, device_type="cuda", gpu_memory=8 * 2**30)
    ddp = plan_memory(cfg, device_type="cuda", gpu_memory=8 * 2**30, processes=2)
    fsdp = plan_memory(cfg, device_type="cuda", gpu_memory=8 * 2**30, processes=4, fsdp=True)
    parts = {p: {c.key: c.bytes for c in plan.resident} for p, plan in (("one", one), ("ddp", ddp), ("fsdp", fsdp))}
    assert parts["ddp"]["ddp_buckets"] == parts["one"]["adapter"]
    assert sum(parts["ddp"].values()) == sum(parts["one"].values()) + parts["one"]["adapter"]
    for key in ("weights_4bit", "adapter", "optimizer"):
        assert parts["fsdp"][key] == -(-parts["one"][key] // 4), key
    assert parts["fsdp"]["quant_constants"] == parts["one"]["quant_constants"]  # not sharded
    assert parts["fsdp"]["fsdp_gathered"] > parts["one"]["weights_4bit"] // 2  # two of the 2 layers, whole
    assert fsdp.max_micro_batch_size >= one.max_micro_batch_size >= ddp.max_micro_batch_size
    # FSDP runs torch's AdamW unless the config names an optimizer (bitsandbytes' cannot take sharded parameters)
    default = plan_memory(cfg_for(llama_dir, tmp_path, **fp32), device_type="cuda", processes=4, fsdp=True)
    assert {c.key: c.bytes for c in default.resident}["optimizer"] == parts["fsdp"]["optimizer"]
    with pytest.raises(ConfigError, match="FSDP cannot run optimizer: adamw_8bit"):
        plan_memory(cfg_for(llama_dir, tmp_path, **fp32, optimizer="adamw_8bit"), device_type="cuda", processes=4,
                    fsdp=True)  # fmt: skip

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base_model": str(llama_dir), "datasets": [{"path": "x"}]}))
    from tests.test_cli import assert_user_error

    res = run_cli(str(tmp_path / "c.yaml"), "--processes", "2", "--fsdp", "--device", "cuda")
    assert_user_error(res, "FSDP shards the 4-bit base only with a float quant storage")
    res = run_cli(str(tmp_path / "c.yaml"), "--set", "bnb_4bit_quant_storage=bfloat16", "--processes", "2",
                  "--fsdp", "--device", "cuda", "--gpu-memory", "8GB")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "for each of 2 GPUs (FSDP)" in res.output and "gathered for compute (FSDP)" in res.output
