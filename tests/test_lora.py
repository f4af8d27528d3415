from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_cli.config import LoRASettings, load_config
from qlora_cli.errors import ModelError
from qlora_cli.kernels.dropout import dropout_mask
from qlora_cli.model.loading import load_base_model
from qlora_cli.model.lora import (
    LoRALinear,
    inject_lora,
    lora_delta,
    lora_disabled,
    lora_layers,
    lora_parameters,
    match_targets,
    merge_weight,
)


def settings(targets, r=4, alpha=8.0, dropout=0.0, rslora=False) -> LoRASettings:
    return LoRASettings(r=r, alpha=alpha, dropout=dropout, target_modules=targets, use_rslora=rslora)


def randomize_B(layer: LoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)


def test_fresh_adapter_changes_nothing():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() == 0
    assert layer.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize("rslora,expected_scaling", [(False, 2.0), (True, 4.0)])
def test_output_is_base_plus_scaled_BAx(rslora, expected_scaling):
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8, use_rslora=rslora)
    randomize_B(layer)
    assert layer.scaling == expected_scaling
    x = torch.randn(2, 16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = base(x) + expected_scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)
    assert (layer(x) - base(x)).abs().max() > 1e-3  # the update is really there


def test_conv1d_base_is_handled_transposed():
    base = Conv1D(8, 16)  # nf=8 outputs, nx=16 inputs; weight (16, 8)
    layer = LoRALinear(base, r=4, alpha=4)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (16, 8, True)
    randomize_B(layer)
    x = torch.randn(3, 16)
    expected = x @ merge_weight(base.weight, layer.lora_A.weight, layer.lora_B.weight, 1.0, True) + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(16, 8), lambda: Conv1D(8, 16)])
def test_merge_equals_unmerged_and_unmerge_restores(make_base):
    base = make_base()
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8)
    randomize_B(layer)
    x = torch.randn(4, 16)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.equal(base.weight, original)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)


def test_lora_delta_math():
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    torch.testing.assert_close(lora_delta(A, B, 0.5), 0.5 * B @ A)
    torch.testing.assert_close(lora_delta(A, B, 0.5, fan_in_fan_out=True), (0.5 * B @ A).T)
    W = torch.randn(8, 16, dtype=torch.bfloat16)
    merged = merge_weight(W, A, B, 2.0)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, W.float() + 2.0 * B @ A)


def test_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.5)
    randomize_B(layer)
    x = torch.randn(64, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_mask_drops_each_element_independently_with_probability_p(p):
    torch.manual_seed(0)
    n = 400_003  # not a multiple of the four 16-bit lanes a CPU draw packs into one 64-bit word
    drop = dropout_mask((n,), p, torch.device("cpu")).float()
    tol = 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations
    assert abs(drop.mean().item() - p) < tol
    for lane in range(4):  # every lane of a 64-bit word is a fair draw
        assert abs(drop[lane::4].mean().item() - p) < 2 * tol
    pairs = drop[:-1] * drop[1:]  # neighbours (same word or not) are independent: P(both) = p^2
    assert abs(pairs.mean().item() - p * p) < 5 * (p * p / n) ** 0.5
    assert not torch.equal(drop, dropout_mask((n,), p, torch.device("cpu")).float())  # a fresh draw each call


def test_dropout_keeps_the_expected_value_and_zeroes_what_it_drops():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.25)
    x = torch.rand(2000, 16) + 1.0  # no zeros of its own
    y = layer.dropout(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.75)


def test_dropout_keeps_the_expected_value_even_when_p_is_near_one():
    """The CPU mask drops with p rounded to 2^-16; the scale follows the rate really used (at p = 0.99999 a
    scale of 1 / (1 - p) would inflate the mean by half)."""
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.99999)
    torch.manual_seed(0)
    y = layer.dropout(torch.ones(2**24))
    assert abs(y.mean().item() - 1.0) < 0.3  # the standard deviation of the mean is 0.0625


def test_disabled_returns_base():
    base = nn.Linear(16, 8)
    model = nn.Sequential(base)
    inject_lora(model, settings(["0"]))
    randomize_B(model[0])
    x = torch.randn(2, 16)
    with lora_disabled(model):
        torch.testing.assert_close(model(x), base(x))
    assert not torch.allclose(model(x), base(x))


@pytest.fixture(scope="module")
def llama_4bit(llama_dir):
    cfg = load_config(None, base_model=str(llama_dir), datasets=[{"path": "x.jsonl"}], bnb_4bit_compute_dtype="float32")
    return cfg


def test_4bit_base_gets_the_same_update(llama_4bit):
    model = load_base_model(llama_4bit, torch.device("cpu"))
    base = model.model.layers[0].self_attn.q_proj
    assert hasattr(base.weight, "quant_state")
    layer = LoRALinear(base, r=4, alpha=8)
    randomize_B(layer)
    x = torch.randn(2, 3, base.in_features)
    expected = base(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="4-bit"):
        layer.merge()


def test_only_adapter_parameters_change_after_a_step(llama_4bit):
    model = load_base_model(llama_4bit, torch.device("cpu"))
    inject_lora(model, settings("all-linear"))
    for _, m in lora_layers(model):
        randomize_B(m)
    before = {n: p.detach().clone() for n, p in model.state_dict(keep_vars=True).items() if torch.is_tensor(p)}
    params = lora_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(10, 60, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert len(changed) == len(params)


def test_all_linear_excludes_head_and_matches_suffixes(model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_factory("llama"))
    names = match_targets(model, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7
    assert match_targets(model, ["v_proj", "q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert match_targets(model, ["layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]
    assert match_targets(model, ["lm_head"]) == ["lm_head"]  # named explicitly, the head may be adapted


def test_targets_matching_nothing_list_the_candidates(model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_factory("llama"))
    with pytest.raises(ModelError) as e:
        match_targets(model, ["q_proj", "qkv"])
    assert "'qkv' matches no module" in str(e.value) and "q_proj, k_proj, v_proj, o_proj" in str(e.value)
    with pytest.raises(ModelError, match="not a linear layer"):
        match_targets(model, ["mlp"])
