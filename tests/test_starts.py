"""Adapter starts (``init_lora_weights``): gaussian, LoftQ, PiSSA and OLoRA, each against PEFT's own initialisation
on the same weights, and through qlora's pipeline (train, resume, save in PEFT's format, merge, eval).

PEFT's PiSSA refuses a 4-bit base (it wants the residual re-quantized by hand), and its OLoRA re-quantizes
``Q − s·B₀A₀`` into a new 4-bit weight. qlora keeps the 4-bit base ``Q`` and takes ``s·B₀A₀`` off through a frozen
copy of the start, so the model qlora trains is exactly PEFT's on a float base holding ``Q`` (the dequantized NF4
weights): that is the model compared here, logits and one step's LoRA gradients, on every architecture.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_cli.config import load_config
from qlora_cli.data.pipeline import collate
from qlora_cli.kernels.lora_linear import dense_weight
from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora_cli.model.adapter_io import save_adapter
from qlora_cli.model.loading import DTYPES, bnb_config, disable_cpu_weight_repacking, load_base_model
from qlora_cli.model.lora import inject_lora, lora_layers
from qlora_cli.model.starts import apply_start, loftq_start, olora_start, original_weights, pissa_start
from qlora_cli.train.loop import run_train
from tests.conftest import ARCHS, interrupted_then_resumed, make_config, upper_rows, write_jsonl
from tests.test_cli import assert_user_error, run_cli
from tests.test_peft_equivalence import NO_DROPOUT

CPU = torch.device("cpu")
TOL = 1e-5  # logits, float32 on both sides: the same model, the offset summed in another order
GRAD_TOL = 1e-4  # gradients through backward passes that sum in other orders


pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


def _cfg(folder, init: str, r: int = 4, alpha: float = 8, **kw):
    return load_config(
        None, base_model=str(folder), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32", lora_r=r,
        lora_alpha=alpha, lora_dropout=0.0, lora_target_modules="all-linear", init_lora_weights=init, **kw,
    )  # fmt: skip


def _ours(folder, init: str, r: int = 4, alpha: float = 8):
    cfg = _cfg(folder, init, r, alpha)
    torch.manual_seed(0)
    model = load_base_model(cfg, CPU)
    inject_lora(model, cfg.lora)
    apply_start(model, cfg.lora, original_weights(cfg.base) if init == "loftq" else None)
    return cfg, model


def _batch(tokenizer):
    from qlora_cli.data.pipeline import Row, tokenize_row

    rows = upper_rows(4, seed=2)
    return collate([tokenize_row(Row("x", r), "completion", tokenizer, False) for r in rows], tokenizer.pad_token_id)


def _nudge(pairs, seed: int = 1) -> None:
    """Move every adapter the same way (a trained adapter, so that A and B both count)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora_A, lora_B in pairs:
            lora_B.add_(torch.randn(lora_B.shape, generator=g) * 0.05)
            lora_A.add_(torch.randn(lora_A.shape, generator=g) * 0.05)


def _float_base_holding_q(folder, model):
    """transformers' float32 model of ``folder`` with every targeted weight replaced by qlora's dequantized NF4 one."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"})
    base.config.use_cache = False
    with torch.no_grad():
        for name, layer in lora_layers(model):
            target = base.get_submodule(name)
            q = dense_weight(layer.base, torch.float32)
            target.weight.copy_(q.T if isinstance(target, Conv1D) else q)
    return base


# ---------------------------------------------------------------------------------------------
# the starts as matrices, against PEFT's functions


def test_pissa_and_olora_matrices_equal_peft_on_the_same_weight(monkeypatch):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import layer as peft_layer

    real = torch.svd_lowrank

    def seeded(*args, **kwargs):  # pissa_niter_N draws from torch's generator: the same draws on both sides
        torch.manual_seed(11)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)  # PEFT 0.22 calls torch.svd_lowrank
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded, raising=False)  # earlier PEFT imported the name

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=False))
    weight = net[0].weight.detach().clone()
    for init in ("pissa", "pissa_niter_3", "olora"):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=init)
        copy = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=False))
        copy[0].weight.data.copy_(weight)
        peft = get_peft_model(copy, config)
        layer = peft.base_model.model[0]
        torch.manual_seed(11)
        if init == "olora":
            lora_A, lora_B = olora_start(weight, 4)
        else:
            lora_A, lora_B = pissa_start(weight, 4, 2.0, 3 if init.endswith("3") else None)
        for mine, theirs in ((lora_A, layer.lora_A["default"].weight), (lora_B, layer.lora_B["default"].weight)):
            assert _rel(mine, theirs) < 1e-5, init
        # PEFT's residual base plus its start is the original weight; ours is the same split
        residual = layer.get_base_layer().weight
        assert _rel(residual + 2.0 * lora_B @ lora_A, weight) < 1e-5
    # the doubled scaling gives another start: the comparison above could fail
    assert _rel(pissa_start(weight, 4, 4.0)[0], pissa_start(weight, 4, 2.0)[0]) > 0.1


def test_loftq_start_is_the_best_rank_r_fix_of_the_quantization_error():
    torch.manual_seed(4)
    original = torch.randn(48, 32)
    quantized = original + 0.1 * torch.randn(48, 32)  # a stand-in 4-bit weight
    for scaling in (1.0, 0.25, 4.0):
        lora_A, lora_B = loftq_start(original, quantized, 8, scaling)
        fixed = quantized + scaling * lora_B @ lora_A
        # Eckart-Young: the error left is the tail of the residual's singular values
        tail = torch.linalg.svdvals(original - quantized)[8:].norm()
        assert abs(float((original - fixed).norm()) - float(tail)) < 1e-4
        assert (original - fixed).norm() < 0.8 * (original - quantized).norm()


@pytest.fixture
def cuda_to_cpu(monkeypatch):
    """PEFT's LoftQ code moves its work to "cuda" (or "xpu") unconditionally; on this CPU-only machine those
    moves go to the CPU instead, and nothing else changes."""
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if a in ("cuda", "xpu") else a for a in args)
        if kwargs.get("device") in ("cuda", "xpu"):
            kwargs["device"] = "cpu"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)


# GPT-2 is left out: PEFT's loader reads its Conv1D weights (in, out) without transposing them and fails
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt2"])
def test_loftq_equals_peft_replace_lora_weights_loftq_on_the_same_4bit_base(
    model_factory, tokenizer, arch, cuda_to_cpu
):
    from peft import LoraConfig, get_peft_model
    from peft.utils.loftq_utils import replace_lora_weights_loftq
    from transformers import AutoModelForCausalLM

    folder = model_factory(arch, initializer_range=0.1, layers=1, hidden=32, **NO_DROPOUT.get(arch, {}))
    cfg, model = _ours(folder, "loftq", r=4, alpha=4)  # PEFT leaves out the scaling: equal where it is 1
    base = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config(cfg.quant), dtype=DTYPES["float32"], device_map={"": "cpu"}
    )
    base.config.use_cache = False
    disable_cpu_weight_repacking(base)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear"))
    replace_lora_weights_loftq(peft, model_path=str(folder / "model.safetensors"))
    modules = dict(peft.base_model.model.named_modules())
    for name, m in lora_layers(model):
        layer = modules[name]
        assert _rel(m.lora_A.weight, layer.lora_A["default"].weight) < 1e-5
        assert _rel(m.lora_B.weight, layer.lora_B["default"].weight) < 1e-5
        assert m.lora_B.weight.norm() > 0  # a real start, not B = 0
    batch = _batch(tokenizer)
    model.train(), peft.train()
    ours, theirs = model(**batch), peft(**batch)
    assert _rel(ours.logits, theirs.logits) < TOL
    ours.loss.backward()
    theirs.loss.backward()
    for name, m in lora_layers(model):
        layer = modules[name]
        assert _rel(m.lora_A.weight.grad, layer.lora_A["default"].weight.grad) < GRAD_TOL
        assert _rel(m.lora_B.weight.grad, layer.lora_B["default"].weight.grad) < GRAD_TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loftq_brings_the_4bit_base_closer_to_the_original_weights(model_factory, arch):
    from safetensors.torch import load_file as load

    folder = model_factory(arch, initializer_range=0.1, layers=1, hidden=32, **NO_DROPOUT.get(arch, {}))
    original = load(str(folder / "model.safetensors"))
    for alpha in (8, 32):  # at any scaling (PEFT's start is LoftQ's at lora_alpha = lora_r only)
        cfg, model = _ours(folder, "loftq", r=8, alpha=alpha)
        for name, m in lora_layers(model):
            w = original[f"{name}.weight"].float()
            w = w.T if arch == "gpt2" else w  # GPT-2's Conv1D files hold (in, out), square ones too
            q = dense_weight(m.base, torch.float32)
            before = (w - q).norm()
            after = (w - (q + m.delta_weight().reshape(q.shape))).norm()
            assert after < 0.9 * before, name


# ---------------------------------------------------------------------------------------------
# the model qlora trains equals PEFT's PiSSA / OLoRA on the same (dequantized NF4) weights


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_pissa_and_olora_logits_and_gradients_equal_peft(model_factory, tokenizer, arch, init):
    from peft import LoraConfig, get_peft_model

    if arch == "gpt2" and init == "olora":
        pytest.skip("PEFT's OLoRA factors GPT-2's Conv1D weight as stored, (in, out), and gets the shapes wrong")
    folder = model_factory(arch, initializer_range=0.1, layers=1, hidden=32, **NO_DROPOUT.get(arch, {}))
    cfg, model = _ours(folder, init)
    batch = _batch(tokenizer)
    model.eval()
    with torch.no_grad():
        start = model(**batch).logits
        from qlora_cli.model.lora import lora_disabled

        with lora_disabled(model):
            plain = model(**batch).logits
    assert _rel(start, plain) < 1e-5  # the start changes nothing: base − s·B₀A₀ + s·B₀A₀
    base = _float_base_holding_q(folder, model)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                           init_lora_weights=init))  # fmt: skip
    modules = dict(peft.base_model.model.named_modules())
    for name, m in lora_layers(model):
        layer = modules[name]
        assert _rel(m.lora_A.weight, layer.lora_A["default"].weight) < 1e-5, name
        assert _rel(m.lora_B.weight, layer.lora_B["default"].weight) < 1e-5, name
    _nudge([(m.lora_A.weight, m.lora_B.weight) for _, m in lora_layers(model)])
    _nudge([(modules[n].lora_A["default"].weight, modules[n].lora_B["default"].weight) for n, _ in lora_layers(model)])
    model.train(), peft.train()
    ours, theirs = model(**batch), peft(**batch)
    assert _rel(ours.logits, theirs.logits) < TOL
    assert _rel(ours.logits, start) > 1e-3  # the nudge counts
    ours.loss.backward()
    theirs.loss.backward()
    worst = 0.0
    for name, m in lora_layers(model):
        layer = modules[name]
        for mine, peft_param in ((m.lora_A.weight, layer.lora_A["default"].weight),
                                 (m.lora_B.weight, layer.lora_B["default"].weight)):  # fmt: skip
            assert peft_param.grad.norm() > 0
            worst = max(worst, _rel(mine.grad, peft_param.grad))
    assert worst < GRAD_TOL, f"{arch}: gradients differ from PEFT's by up to {worst:.2e}"


def test_the_fused_path_takes_the_offset_off_too(llama_dir, tokenizer):
    from qlora_cli.model.lora import set_fused

    _, model = _ours(llama_dir, "pissa")
    _nudge([(m.lora_A.weight, m.lora_B.weight) for _, m in lora_layers(model)])
    batch = _batch(tokenizer)
    plain = model(**batch)
    plain.loss.backward()
    grads = [m.lora_A.weight.grad.clone() for _, m in lora_layers(model)]
    model.zero_grad()
    set_fused(model, True)
    fused = model(**batch)
    fused.loss.backward()
    assert _rel(fused.logits, plain.logits) < TOL
    for g, (_, m) in zip(grads, lora_layers(model)):
        assert _rel(m.lora_A.weight.grad, g) < GRAD_TOL


def test_peft_loads_a_pissa_folder_as_plain_lora_of_twice_the_rank_with_the_same_logits(llama_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, model = _ours(llama_dir, "pissa", r=4, alpha=8)
    _nudge([(m.lora_A.weight, m.lora_B.weight) for _, m in lora_layers(model)])
    model.eval()
    save_adapter(model, tmp_path, cfg.lora, str(llama_dir))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)  # PEFT's conversion
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert all(t.shape[0] == 8 for k, t in tensors.items() if k.endswith("lora_A.weight"))
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=bnb_config(cfg.quant), dtype=torch.float32, device_map={"": "cpu"}
    )
    disable_cpu_weight_repacking(base)
    peft = PeftModel.from_pretrained(base, tmp_path).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert _rel(model(**batch).logits, peft(**batch).logits) < TOL


# ---------------------------------------------------------------------------------------------
# through qlora's pipeline


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_a_start_trains_resumes_bit_exact_merges_and_evaluates(tmp_path, llama_dir, monkeypatch, init):
    from rich.console import Console

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(32, seed=4))
    kw = dict(init_lora_weights=init, lora_target_modules="all-linear", learning_rate=5e-3, max_steps=6,
              save_steps=3, lora_dropout=0.1, micro_batch_size=4, lora_r=4, lora_alpha=8, val_set_size=0.25)  # fmt: skip
    quiet = Console(quiet=True)
    straight = tmp_path / "straight"
    run_train(make_config(llama_dir, data, straight, **kw), console=quiet)
    saved = load_file(str(straight / ADAPTER_WEIGHTS))
    rank = 8 if init == "pissa" else 4  # PiSSA is saved converted: [A; A₀], [B, −B₀]
    assert {t.shape[0] for k, t in saved.items() if k.endswith("lora_A.weight")} == {rank}
    assert json.loads((straight / ADAPTER_CONFIG).read_text())["r"] == rank

    resumed = tmp_path / "resumed"
    interrupted_then_resumed(make_config(llama_dir, data, resumed, **kw), monkeypatch, quiet)
    again = load_file(str(resumed / ADAPTER_WEIGHTS))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    out = tmp_path / "eval.json"
    res = run_cli("eval", str(straight), "--device", "cpu", "--json", str(out), "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    base, tuned = json.loads(out.read_text())["models"]
    assert tuned["loss"] < base["loss"]  # it learned (single steps' losses are too noisy to compare)

    from qlora_cli.merge import run_merge

    merged = run_merge(straight, tmp_path / "merged", device="cpu", console=quiet)  # the offset comes along
    assert merged.check is not None and merged.check.problems == [] and merged.check.adapter_kl > 0
    assert merged.check.mean_kl < 0.01 * merged.check.adapter_kl


def test_a_pissa_start_resumed_keeps_its_offset_from_the_checkpoint(tmp_path, llama_dir, monkeypatch):
    """Resume restores the frozen start from the checkpoint, not from a fresh SVD: a run whose SVD is replaced
    by another start on resume must still finish with the uninterrupted run's adapter."""
    from rich.console import Console

    from qlora_cli.model import starts

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=5))
    kw = dict(init_lora_weights="pissa", max_steps=4, save_steps=2, micro_batch_size=4, lora_r=4, lora_alpha=8,
              learning_rate=2e-3)  # fmt: skip
    quiet = Console(quiet=True)
    run_train(make_config(llama_dir, data, tmp_path / "a", **kw), console=quiet)
    cfg = make_config(llama_dir, data, tmp_path / "b", **kw)
    real_start = starts.pissa_start

    def other_start() -> None:  # a resume that recomputed the start would now get another one
        monkeypatch.setattr(starts, "pissa_start", lambda w, r, s, n=None: tuple(2 * t for t in real_start(w, r, s, n)))

    interrupted_then_resumed(cfg, monkeypatch, quiet, at=3, before_resume=other_start)
    a = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    b = load_file(str(tmp_path / "b" / ADAPTER_WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"init_lora_weights": "loftq", "loftq_iter": 2}, "'loftq_iter': only 1 (more alternating steps re-quantize"),
        ({"loftq_iter": 2}, "'loftq_iter': applies to init_lora_weights: loftq"),
        ({"init_lora_weights": "loftq", "load_in_4bit": False}, "load_in_4bit: false there is none"),
        ({"init_lora_weights": "pissa", "use_dora": True}, "not offered with use_dora"),
        ({"init_lora_weights": False}, "is not offered"),
        ({"init_lora_weights": "eva"}, "expected one of default, gaussian, loftq, pissa, olora"),
        ({"init_lora_weights": "pissa_niter_0"}, "pissa_niter_N"),
    ],
)
def test_impossible_starts_are_one_line_errors(tmp_path, llama_dir, extra, message):
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    config = {"base_model": str(llama_dir), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o"),
              "device": "cpu", **extra}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    res = run_cli("train", str(path))
    assert_user_error(res, message)
    assert not (tmp_path / "o").exists()


def test_loftq_on_a_base_whose_files_lack_a_weight_is_one_line(tmp_path, llama_dir):
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight_renamed"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    reader = original_weights(_cfg(base, "loftq").base)
    assert reader("model.layers.0.mlp.down_proj", (64, 128)).shape == (64, 128)
    with pytest.raises(Exception, match="down_proj.weight in .* has shape \\(64, 128\\), not \\(64, 64\\)"):
        reader("model.layers.0.mlp.down_proj", (64, 64))
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=1))
    config = {"base_model": str(base), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o"),
              "device": "cpu", "init_lora_weights": "loftq", "lora_target_modules": "all-linear",
              "bnb_4bit_compute_dtype": "float32"}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    res = run_cli("train", str(tmp_path / "c.yaml"))
    assert_user_error(res, "loftq found no weight 'model.layers.0.mlp.up_proj.weight'")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_gaussian_start_draws_a_with_peft_spread(llama_dir):
    cfg, model = _ours(llama_dir, "gaussian", r=8, alpha=16)
    for _, m in lora_layers(model):
        assert torch.count_nonzero(m.lora_B.weight) == 0
        std = float(m.lora_A.weight.detach().std())
        assert 0.08 < std < 0.17  # N(0, 1/r) with r = 8: 0.125; Kaiming-uniform over 32 inputs would be ~0.1 too,
    # so compare the shape of the distribution: a normal has tails past 2.5 std, a uniform has none
    a = torch.cat([m.lora_A.weight.flatten() for _, m in lora_layers(model)])
    assert (a.abs() > 2.5 * 0.125).any()
