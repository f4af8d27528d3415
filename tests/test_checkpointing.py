"""Gradient checkpointing on every transformers release pyproject.toml allows (issue 13 item 1).

transformers has three shapes of the API within 5.x; qlora tells them apart by what the methods accept:
  C  ``activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)`` (5.23+; the
     old name stays as a deprecated ``**kwargs`` alias)
  B  ``gradient_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)`` (5.17-5.22)
  A  ``gradient_checkpointing_enable(gradient_checkpointing_kwargs)`` (5.0-5.14), with ``every_n_layers`` but no
     ``offload`` in 5.16: qlora applies the options itself
(read from each release's modeling_utils.py: 5.0, 5.4, 5.9, 5.13, 5.14, 5.16, 5.17, 5.18, 5.21, 5.22, 5.23, 5.24)
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qlora_cli.config import load_config
from qlora_cli.model.loading import _checkpoint_options, enable_gradient_checkpointing, load_base_model

pytestmark = pytest.mark.oldest  # make test-oldest: the whole file, on the lowest versions

OPTIONS = [(False, 1), (True, 1), (False, 2), (True, 3)]  # (offload, every_n_layers)


class _Fake(torch.nn.Module):
    """A model whose parameters live off the CPU (meta), so ``offload`` is not dropped as pointless."""

    supports_gradient_checkpointing = True

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.calls: list[tuple] = []


class _ShapeC(_Fake):
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        self.calls.append(("activation", activation_checkpointing_kwargs, every_n_layers, offload))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.calls.append(("deprecated alias",))


class _ShapeB(_Fake):
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        self.calls.append(("gradient", gradient_checkpointing_kwargs, every_n_layers, offload))


@pytest.mark.parametrize("offload,every", OPTIONS)
@pytest.mark.parametrize("shape,name", [(_ShapeC, "activation"), (_ShapeB, "gradient")])
def test_the_method_that_takes_the_options_is_called_with_them(shape, name, offload, every):
    model = shape()
    enable_gradient_checkpointing(model, offload, every)
    assert model.calls == [(name, {"use_reentrant": False}, every, offload)]


def test_offload_is_dropped_where_activations_already_live_on_the_host():
    model = _ShapeC()
    model.w = torch.nn.Parameter(torch.empty(1))
    enable_gradient_checkpointing(model, True, 2)
    assert model.calls == [("activation", {"use_reentrant": False}, 2, False)]


@pytest.fixture(scope="module")
def four_layers(model_factory):
    return model_factory("llama", layers=4, initializer_range=0.1)


def _model(folder):
    cfg = load_config(None, base_model=str(folder), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32")
    model = load_base_model(cfg, torch.device("cpu"))
    for layer in model.model.layers:  # something in every layer to take a gradient of
        layer.mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(layer.mlp.down_proj.out_features))
    model.train()
    return model


def _step(model) -> list[torch.Tensor]:
    ids = torch.arange(5, 37).reshape(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [layer.mlp.down_proj.bias.grad.clone() for layer in model.model.layers]
    model.zero_grad(set_to_none=True)
    return grads


def _as_transformers_5_0(model, monkeypatch, version: str = "5.0") -> None:
    """The 5.0-5.16 API on a real model: no activation_checkpointing_enable, and a gradient_checkpointing_enable
    that takes only the checkpoint kwargs (5.16: and every_n_layers) and checkpoints every layer (5.0's body)."""

    def enable(gradient_checkpointing_kwargs=None):
        fn = partial(checkpoint, **(gradient_checkpointing_kwargs or {"use_reentrant": True}))
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=fn)
        model.enable_input_require_grads()

    def enable_5_16(gradient_checkpointing_kwargs=None, every_n_layers=1):
        enable(gradient_checkpointing_kwargs)
        for i, layer in enumerate(model.model.layers):
            layer.gradient_checkpointing = i % every_n_layers == 0

    monkeypatch.setattr(model, "activation_checkpointing_enable", None, raising=False)
    monkeypatch.setattr(model, "gradient_checkpointing_enable", enable if version == "5.0" else enable_5_16)


@pytest.mark.parametrize("api", ["installed", "5.0", "5.16"])
def test_every_n_layers_recomputes_only_those_layers_with_the_same_gradients(four_layers, api, monkeypatch):
    plain = _step(_model(four_layers))
    model = _model(four_layers)
    if api != "installed":
        _as_transformers_5_0(model, monkeypatch, api)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated alias is not what gets called
        enable_gradient_checkpointing(model, False, 2)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, False]
    grads = _step(model)
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g, p, atol=1e-6, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads)


def test_offload_by_hand_saves_checkpoint_inputs_on_the_host_with_the_same_gradients(four_layers, monkeypatch):
    """5.0's API has no offload: qlora wraps each layer's checkpoint in save_on_cpu(pin_memory=True)."""
    plain = _step(_model(four_layers))
    model = _model(four_layers)
    _as_transformers_5_0(model, monkeypatch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    entered = []
    real = torch.autograd.graph.save_on_cpu

    def recording(*a, **kw):
        entered.append(kw.get("pin_memory"))
        return real(*a, **{**kw, "pin_memory": False})  # no pinned memory without an accelerator

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", recording)
    _checkpoint_options(model, True, 3)
    grads = _step(model)
    assert entered == [True, True]  # layers 0 and 3 (every 3rd), once each in the forward
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g, p, atol=1e-6, rtol=1e-5)


def test_options_on_a_model_without_decoder_layers_are_a_config_error(monkeypatch):
    from qlora_cli.errors import ConfigError

    class Old(_Fake):
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.calls.append(("old", gradient_checkpointing_kwargs))

    model = Old()
    enable_gradient_checkpointing(model, False, 1)
    assert model.calls == [("old", {"use_reentrant": False})]
    with pytest.raises(ConfigError, match="no checkpointed decoder layers"):
        enable_gradient_checkpointing(model, True, 2)
