"""Every model call outside the training step runs under the run's precision (issue 13 item 8).

A bf16 run keeps norms in float32 and computes matmuls in bfloat16 under autocast; a forward outside autocast
feeds float32 norm outputs to bf16 layers and dies (``expected m1 and m2 to have the same dtype``), or, where it
survives, scores a different model than the one trained. Each test records, for every forward of the causal LM
(the top-level ``...ForCausalLM`` module), whether CPU autocast was on and to which dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from qlora_cli.config import load_config
from qlora_cli.model.loading import load_base_model
from tests.conftest import make_config, upper_rows, write_jsonl


@contextmanager
def forwards_of_the_model() -> Iterator[list[torch.dtype | None]]:
    """Per forward of a causal LM inside the block: the CPU autocast dtype it ran under, or None."""
    seen: list[torch.dtype | None] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if type(module).__name__.endswith("ForCausalLM"):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def bf16_base(model_factory):
    return model_factory("llama", initializer_range=0.1)


@pytest.mark.oldest
def test_packing_check_and_train_time_eval_run_under_bf16(tmp_path, bf16_base, quiet_console, monkeypatch):
    """sample_packing with the default bf16 compute dtype trains (it crashed in the packing check before the
    first step); the check, the steps and the eval each ran their forwards under bf16 autocast."""
    from qlora_cli.train import loop as train_mod

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=3))
    cfg = make_config(
        bf16_base, data, tmp_path / "run", bnb_4bit_compute_dtype="bfloat16", sample_packing=True,
        sequence_len=64, micro_batch_size=2, max_steps=2, eval_datasets=[{"path": str(data)}],
    )  # fmt: skip
    calls: dict[str, list] = {}
    real_check, real_eval = train_mod.check_packing_isolation, train_mod.evaluate_loss

    def check(*a, **kw):
        with forwards_of_the_model() as seen:
            real_check(*a, **kw)
        calls["packing check"] = seen

    def evaluate_loss(*a, **kw):
        with forwards_of_the_model() as seen:
            result = real_eval(*a, **kw)
        calls.setdefault("eval", []).extend(seen)
        return result

    monkeypatch.setattr(train_mod, "check_packing_isolation", check)
    monkeypatch.setattr(train_mod, "evaluate_loss", evaluate_loss)
    result = train_mod.run_train(cfg, console=quiet_console)
    assert calls["packing check"] == [torch.bfloat16] * 2  # packed, then the second example alone
    assert calls["eval"] and set(calls["eval"]) == {torch.bfloat16}
    evals = [r for r in result.history if r["type"] == "eval"]
    assert evals and all(0 < r["eval_loss"] < 10 for r in evals)


def test_packing_check_under_bf16_still_refuses_leaking_attention(model_factory):
    from qlora_cli.errors import ConfigError
    from qlora_cli.train.loop import check_packing_isolation
    from qlora_cli.train.step import Precision

    cfg = load_config(None, base_model=str(model_factory("opt")), datasets=[{"path": "x"}])  # bf16: the default
    assert cfg.bnb_4bit_compute_dtype == "bfloat16"
    model = load_base_model(cfg, torch.device("cpu"))
    precision = Precision.for_run("bfloat16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="lets packed examples attend"):
        check_packing_isolation(model, torch.device("cpu"), 90, precision)


def test_scoring_and_loss_default_to_the_models_compute_dtype(bf16_base, tokenizer):
    """A caller that passes no autocast (the demo, scripts) scores a bf16 model as it was trained."""
    from qlora_cli.data.pipeline import Row, tokenize_row
    from qlora_cli.scoring import generate_ids
    from qlora_cli.train.loss import evaluate_loss

    cfg = load_config(None, base_model=str(bf16_base), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="bfloat16")
    model = load_base_model(cfg, torch.device("cpu"))
    examples = [tokenize_row(Row("r", r), "completion", tokenizer, True) for r in upper_rows(3, seed=1)]
    with forwards_of_the_model() as seen:
        evaluate_loss(model, examples, 4, tokenizer.pad_token_id, torch.device("cpu"))
        generate_ids(model, tokenizer, [e.input_ids[:6] for e in examples], max_new_tokens=2)
    assert len(seen) == 1 + 2 and set(seen) == {torch.bfloat16}

    f32 = load_base_model(cfg.model_copy(update={"bnb_4bit_compute_dtype": "float32"}), torch.device("cpu"))
    with forwards_of_the_model() as seen:
        evaluate_loss(f32, examples, 4, tokenizer.pad_token_id, torch.device("cpu"))
    assert seen == [None]  # float32 runs without autocast, as training does


def test_qlora_eval_scores_under_the_runs_precision(tmp_path, bf16_base, quiet_console):
    from qlora_cli.evaluate import EvalOptions, evaluate
    from qlora_cli.train.loop import run_train

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=5))
    run_train(
        make_config(bf16_base, data, tmp_path / "run", bnb_4bit_compute_dtype="bfloat16", max_steps=1),
        console=quiet_console,
    )
    with forwards_of_the_model() as seen:
        evaluate([tmp_path / "run"], EvalOptions(data=str(data), include_base=False, max_new_tokens=2, limit=4))
    assert len(seen) >= 3 and set(seen) == {torch.bfloat16}  # the loss batch and each generated token


def test_memory_plan_traces_under_the_runs_precision(bf16_base):
    from transformers import AutoConfig

    from qlora_cli.memory_plan.tracer import trace_step

    cfg = make_config(bf16_base, bf16_base, bf16_base, bnb_4bit_compute_dtype="bfloat16")
    for train in (True, False):
        with forwards_of_the_model() as seen:
            trace_step(AutoConfig.from_pretrained(bf16_base), cfg, device_type="cuda", micro_batch_size=2,
                       seq_len=32, gradient_checkpointing=train, train=train)  # fmt: skip
        assert seen == [torch.bfloat16]


def test_merge_self_check_runs_the_adapter_under_the_runs_precision(tmp_path, bf16_base, quiet_console):
    from qlora_cli.merge import run_merge
    from qlora_cli.train.loop import run_train

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=5))
    run_train(
        make_config(bf16_base, data, tmp_path / "run", bnb_4bit_compute_dtype="bfloat16", max_steps=1),
        console=quiet_console,
    )
    with forwards_of_the_model() as seen:
        run_merge(tmp_path / "run", tmp_path / "merged", device="cpu", console=quiet_console)
    # the adapter on its base (and with the adapter off) under bf16; the merged model plainly, in float32
    assert seen.count(torch.bfloat16) >= 2 and seen[-1] is None


# ---------------------------------------------------------------------------------------------
# activations between decoder layers in the compute dtype (issue 13 item 2)


def _decoder_layers(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.mark.oldest
@pytest.mark.parametrize("arch,fused", [("llama", True), ("llama", False), ("gpt2", True), ("qwen2", True)])
def test_hidden_states_between_decoder_layers_stay_bf16(model_factory, arch, fused):
    """Norms keep float32 weights and math, but under bf16 autocast they hand the next matmul bf16, as PEFT's
    and Unsloth's bf16 norms do: the residual stream, each layer's input and output, and the projections'
    outputs are bf16 (before, the stream was float32 after layer 0: twice the activation memory)."""
    from qlora_cli.config import LoRASettings
    from qlora_cli.model.lora import inject_lora, lora_layers, set_fused
    from qlora_cli.train.step import Precision

    cfg = load_config(None, base_model=str(model_factory(arch)), datasets=[{"path": "x"}])  # bf16: the default
    model = load_base_model(cfg, torch.device("cpu"))
    inject_lora(model, LoRASettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False))
    set_fused(model, fused)
    model.train()
    layers = _decoder_layers(model)
    seen: list[tuple[str, torch.dtype]] = []

    def record(name):
        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            seen.append((f"{name} in", args[0].dtype))
            seen.append((f"{name} out", first.dtype))

        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_hook(record(f"layer {i}"))
    for name, module in lora_layers(model):
        module.register_forward_hook(record(name))
    ids = torch.arange(5, 37).reshape(2, 16)
    with Precision.for_run("bfloat16", torch.device("cpu")).autocast():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len(layers) == 2 and len(seen) > 4
    assert [k for k, dtype in seen if dtype != torch.bfloat16 and not k.endswith(" in")] == []
    assert [k for k, dtype in seen if dtype != torch.bfloat16 and k.startswith("layer")] == []
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for _, m in lora_layers(model))
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n or "ln_" in n} == {torch.float32}


def test_gpu_selfcheck_compares_qlora_and_peft_under_the_same_autocast(tmp_path, bf16_base, quiet_console):
    """scripts/gpu_selfcheck.py's PEFT comparison on a bf16 run (issue 13 item 6): both stacks under bf16
    autocast (a bare bf16 forward of qlora's model crashed on its float32 norms), top-1 judged where decisive,
    on enough positions (>= 100) that one rounding flip cannot fail it."""
    import importlib.util

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_cli.model.loading import DTYPES, bnb_config, disable_cpu_weight_repacking
    from qlora_cli.run_folder import load_adapted_model, open_run
    from qlora_cli.train.loop import run_train

    spec = importlib.util.spec_from_file_location(
        "gpu_selfcheck", Path(__file__).parent.parent / "scripts" / "gpu_selfcheck.py"
    )
    selfcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selfcheck)
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=5))
    cfg = make_config(bf16_base, data, tmp_path / "run", bnb_4bit_compute_dtype="bfloat16", max_steps=3,
                      learning_rate=2e-2, lora_target_modules="all-linear")  # fmt: skip
    run_train(cfg, console=quiet_console)
    cpu = torch.device("cpu")
    ours, _ = load_adapted_model(open_run(tmp_path / "run"), cpu)
    reference = AutoModelForCausalLM.from_pretrained(
        bf16_base, quantization_config=bnb_config(cfg.quant), dtype=DTYPES["bfloat16"], device_map={"": cpu}
    )
    disable_cpu_weight_repacking(reference)
    numbers = selfcheck.compare_with_peft(
        ours, PeftModel.from_pretrained(reference, tmp_path / "run").eval(), cpu, "bfloat16"
    )
    assert selfcheck.RESULTS[-1]["ok"], numbers
    assert numbers["decisive"] >= selfcheck.MIN_DECISIVE and numbers["top1_decisive"] >= 0.98
