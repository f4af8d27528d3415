"""DoRA (``use_dora``) equals PEFT's DoRA on the same 4-bit base, and runs through qlora's pipeline.

PEFT's layer: ``base(x) + (m/n - 1)·W x + (m/n)·s·B A x``, ``n = ‖W + s·BA‖_row`` detached; under dropout ``W x`` is
recomputed on the dropped-out input. Both sides hold the same NF4 base, the same A, B and magnitude (random, so
every term matters); logits and the gradients of A, B and m are compared in float32.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_cli.config import load_config
from qlora_cli.data.pipeline import collate
from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora_cli.model.adapter_io import save_adapter
from qlora_cli.model.loading import DTYPES, bnb_config, disable_cpu_weight_repacking, load_base_model
from qlora_cli.model.lora import inject_lora, lora_layers, lora_parameters
from qlora_cli.train.loop import run_train
from tests.conftest import ARCHS, make_config, upper_rows, write_jsonl
from tests.test_cli import assert_user_error, run_cli
from tests.test_peft_equivalence import NO_DROPOUT

CPU = torch.device("cpu")
TOL = 1e-5  # logits: float32 on both sides; the paths differ in summation order only
GRAD_TOL = 1e-4  # gradients: the same, through a backward pass that sums in other orders (measured up to 3e-5)


pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def _cfg(folder, dropout: float = 0.0):
    return load_config(
        None, base_model=str(folder), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32", lora_r=8,
        lora_alpha=16, lora_dropout=dropout, lora_target_modules="all-linear", use_dora=True,
    )  # fmt: skip


def _ours(folder, dropout: float):
    cfg = _cfg(folder, dropout)
    torch.manual_seed(0)
    model = load_base_model(cfg, CPU)
    inject_lora(model, cfg.lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
            m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(m.lora_magnitude_vector.shape, generator=g))
    model.train()
    return cfg, model


def _peft(folder, cfg, model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config(cfg.quant), dtype=DTYPES["float32"], device_map={"": "cpu"}
    )
    base.config.use_cache = False
    disable_cpu_weight_repacking(base)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=cfg.lora_dropout, target_modules="all-linear", use_dora=True)
    peft = get_peft_model(base, lora)
    modules = dict(peft.base_model.model.named_modules())
    with torch.no_grad():
        for name, m in lora_layers(model):
            layer = modules[name]
            layer.lora_A["default"].weight.copy_(m.lora_A.weight)
            layer.lora_B["default"].weight.copy_(m.lora_B.weight)
            layer.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector)
    peft.train()
    return peft, modules


def _batch(tokenizer):
    rows = upper_rows(4, seed=2)
    from qlora_cli.data.pipeline import Row, tokenize_row

    return collate([tokenize_row(Row("x", r), "completion", tokenizer, False) for r in rows], tokenizer.pad_token_id)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


# dropout 1e-9: both sides take the dropout branch (W x recomputed on the dropped-out input), with no element dropped
@pytest.mark.parametrize("dropout", [0.0, 1e-9])
@pytest.mark.parametrize("arch", ARCHS)
def test_dora_logits_and_gradients_equal_peft(model_factory, tokenizer, arch, dropout):
    folder = model_factory(arch, initializer_range=0.1, layers=1, hidden=32, **NO_DROPOUT.get(arch, {}))
    cfg, model = _ours(folder, dropout)
    peft, modules = _peft(folder, cfg, model)
    batch = _batch(tokenizer)
    ours = model(**batch)
    theirs = peft(**batch)
    assert _rel(ours.logits, theirs.logits) < TOL
    ours.loss.backward()
    theirs.loss.backward()
    worst = 0.0
    for name, m in lora_layers(model):
        layer = modules[name]
        for mine, peft_param in (
            (m.lora_A.weight, layer.lora_A["default"].weight),
            (m.lora_B.weight, layer.lora_B["default"].weight),
            (m.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight),
        ):
            assert peft_param.grad.norm() > 0
            worst = max(worst, _rel(mine.grad, peft_param.grad))
    assert worst < GRAD_TOL, f"{arch}: gradients differ from PEFT's by up to {worst:.2e}"


def test_a_fresh_dora_adapter_changes_nothing_and_its_magnitude_is_peft_start(llama_dir, tokenizer):
    cfg = _cfg(llama_dir)
    torch.manual_seed(0)
    model = load_base_model(cfg, CPU)
    batch = _batch(tokenizer)
    with torch.no_grad():
        before = model(**batch).logits
    inject_lora(model, cfg.lora)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    peft, modules = _peft(llama_dir, cfg, model)
    for name, m in lora_layers(model):  # PEFT's own start from the same B = 0: the row norms of W
        peft_layer = modules[name]
        peft_layer.lora_magnitude_vector["default"].update_layer(
            base_layer=peft_layer.get_base_layer(), lora_A=m.lora_A.weight, lora_B=m.lora_B.weight, scaling=2.0
        )
        start = peft_layer.lora_magnitude_vector["default"].weight
        assert _rel(m.lora_magnitude_vector, start) < 1e-6
    layers = list(lora_layers(model))
    assert len(lora_parameters(model)) == 3 * len(layers)  # A, B and the magnitude are trained


def test_peft_loads_what_qlora_saves_with_the_same_logits(llama_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, model = _ours(llama_dir, 0.0)
    model.eval()
    save_adapter(model, tmp_path, cfg.lora, str(llama_dir))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["use_dora"] is True
    keys = load_file(str(tmp_path / ADAPTER_WEIGHTS)).keys()
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=bnb_config(cfg.quant), dtype=torch.float32, device_map={"": "cpu"}
    )
    disable_cpu_weight_repacking(base)
    peft = PeftModel.from_pretrained(base, tmp_path).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert _rel(model(**batch).logits, peft(**batch).logits) < TOL


def test_dora_trains_resumes_bit_exact_evaluates_and_is_refused_where_not_taken(tmp_path, llama_dir, monkeypatch):
    from rich.console import Console

    from qlora_cli.train import loop

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(32, seed=4))
    kw = dict(use_dora=True, lora_target_modules="all-linear", learning_rate=5e-3, max_steps=6, save_steps=3,
              lora_dropout=0.1, micro_batch_size=4, val_set_size=0.25)  # fmt: skip
    quiet = Console(quiet=True)
    straight = tmp_path / "straight"
    result = run_train(make_config(llama_dir, data, straight, **kw), console=quiet)
    records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert losses[-1] < losses[0]
    saved = load_file(str(straight / ADAPTER_WEIGHTS))
    magnitudes = [v for k, v in saved.items() if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 14  # 7 projections x 2 layers

    resumed = tmp_path / "resumed"
    cfg = make_config(llama_dir, data, resumed, **kw)
    real = loop.train_step

    def stop_at_4(run, window):
        if run.state.step == 4:
            raise KeyboardInterrupt
        return real(run, window)

    monkeypatch.setattr(loop, "train_step", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, console=quiet)
    monkeypatch.setattr(loop, "train_step", real)
    run_train(cfg.model_copy(update={"resume_from_checkpoint": "auto"}), console=quiet)
    again = load_file(str(resumed / ADAPTER_WEIGHTS))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    out = tmp_path / "eval.json"
    res = run_cli("eval", str(straight), "--device", "cpu", "--json", str(out), "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    base, tuned = json.loads(out.read_text())["models"]
    assert tuned["loss"] == pytest.approx(result.eval_loss, rel=1e-5) and tuned["loss"] < base["loss"]

    from qlora_cli.merge import run_merge

    merged = run_merge(straight, tmp_path / "merged", device="cpu", console=quiet)  # the magnitude folded in
    assert merged.check is not None and merged.check.problems == [] and merged.check.adapter_kl > 0
    assert merged.check.mean_kl < 0.01 * merged.check.adapter_kl


def test_gguf_lora_export_and_serve_refuse_a_dora_adapter_in_one_line(tmp_path, llama_dir):
    from qlora_cli.errors import ModelError

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=4))
    run_train(make_config(llama_dir, data, tmp_path / "run", use_dora=True, max_steps=1), console=None)
    out = tmp_path / "x.gguf"
    result = run_cli("export", str(tmp_path / "run"), "-o", str(out), "--format", "gguf-lora")
    assert_user_error(result, "is a DoRA adapter (use_dora): llama.cpp applies plain LoRA only")
    assert not out.exists()
    from qlora_cli.config import ModelSettings, QuantSettings
    from qlora_cli.serving.multi_lora import MultiLoRA

    multi = MultiLoRA(load_base_model(ModelSettings(str(llama_dir), quant=QuantSettings(compute_dtype="float32")), CPU))
    with pytest.raises(ModelError, match="is a DoRA adapter \\(use_dora\\), which qlora serve does not take yet"):
        multi.load("dora", tmp_path / "run")
    assert list(multi.adapters) == []
    from qlora_cli.inspect.adapter import adapter_report

    report = adapter_report(tmp_path / "run")
    assert report["adapter_kind"] == "DoRA" and report["modules"] == 4  # q_proj and v_proj of 2 layers
    assert any("DoRA adapters (use_dora) are not supported by vLLM" in p for p in report["serving"]["problems"])


def test_merge_folds_the_magnitude_in(tmp_path, llama_dir):
    """A DoRA adapter whose magnitudes are far from the row norms: the merged weights are m / ‖W + s·BA‖_row ·
    (W + s·BA) of the dequantized NF4 weight, and the merged model reproduces the adapter (the self-check)."""
    from rich.console import Console

    from qlora_cli.config import dump_config
    from qlora_cli.merge import run_merge
    from qlora_cli.merge.weights import nf4_roundtrip
    from qlora_cli.model.lora import dora_weight

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    run = tmp_path / "run"
    cfg = make_config(llama_dir, data, run, use_dora=True, lora_target_modules="all-linear", lora_r=8, lora_alpha=16)
    _, model = _ours(llama_dir, 0.0)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_magnitude_vector.mul_(1.5)  # far from the start: leaving it out would show
    save_adapter(model, run, cfg.lora, cfg.base_model)
    (run / "qlora_config.yaml").write_text(dump_config(cfg))
    result = run_merge(run, tmp_path / "merged", device="cpu", dtype="float32", console=Console(quiet=True))
    assert result.check is not None and result.check.problems == [], result.check
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    original = load_file(str(llama_dir / "model.safetensors"))
    name, layer = next(iter(lora_layers(model)))
    key = f"{name}.weight"
    base = nf4_roundtrip(original[key].float(), cfg.quant, torch.float32)
    expect = dora_weight(base, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, layer.lora_magnitude_vector)
    assert _rel(merged[key], expect) < 1e-6
