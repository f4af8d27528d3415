"""Training equals PEFT step for step (issue 20), on every architecture the tests build.

The same NF4 base (quantization is deterministic, so both loads hold the same 4-bit weights), the same adapter
initial weights (copied from qlora's layers into PEFT's, with a non-zero B so the adapter is on the path from
the first step), the same batches and the same paged 8-bit AdamW settings; 20 optimizer steps of qlora's own
step (``train.step.accumulate_gradients``, clipping, the optimizer ``train.loop.build_optimizer`` builds) against the plain
PEFT loop (the model's own mean loss, backward, clip, step).

Both sides are made to define the same thing: dropout is 0 (LoRA and the base model's own), every example has
the same number of target tokens (so qlora's token-level normalisation across the two accumulated micro-batches
equals the mean of per-micro-batch means that the PEFT loop computes), and PEFT's model keeps qlora's dtypes
(norms and biases float32, embeddings and head in the compute dtype; ``prepare_model_for_kbit_training`` would
also upcast the embeddings, which under bf16 changes the residual stream's precision, not the method).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from qlora_cli.config import load_config
from qlora_cli.data.pipeline import Row, collate, tokenize_row
from qlora_cli.model.loading import (
    DTYPES,
    bnb_config,
    disable_cpu_weight_repacking,
    load_base_model,
    upcast_small_parameters,
)
from qlora_cli.model.lora import inject_lora, lora_layers, lora_parameters
from tests.conftest import ARCHS

STEPS = 20
ACCUMULATION = 2
# dropout keys per architecture whose defaults are not 0 (the others default to 0)
NO_DROPOUT = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "opt": {"dropout": 0.0},
    "phi3": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0},
}
# (compute dtype) -> (max relative loss difference per step, max relative adapter-weight difference after 20 steps)
# float32: the same operations in the same order up to the fused path's regrouping; bf16: both round every matmul
# to 8 bits of mantissa, in different places on the fused path, and Adam's normalised steps magnify it.
TOLERANCE = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 3e-1)}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second thread only adds synchronisation (and waits for a busy core on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(tokenizer, n_micro: int, size: int) -> list[list]:
    """Micro-batches of completion examples that all have 6 target tokens (5 letters + EOS), prompts of
    varying length (so padding and masking are exercised)."""
    rng = random.Random(0)
    examples = []
    for _ in range(n_micro * size):
        word = "".join(rng.choice("abcdefghij") for _ in range(5))
        row = Row("eq", {"prompt": f"copy {'x' * rng.randint(0, 4)}{word}: ", "completion": word})
        examples.append(tokenize_row(row, "completion", tokenizer, False))
    assert len({e.n_targets for e in examples}) == 1
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def _peft_model(folder, cfg, lora_init: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.bnb_4bit_compute_dtype]
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config(cfg.quant), dtype=dtype, device_map={"": "cpu"}
    )
    model.config.use_cache = False
    disable_cpu_weight_repacking(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if dtype != torch.float32:
        upcast_small_parameters(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora)
    modules = dict(model.base_model.model.named_modules())
    params = []
    with torch.no_grad():
        for name, (a, b) in lora_init.items():
            layer = modules[name]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            params += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    model.train()
    return model, params


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_equals_peft_step_for_step(model_factory, tokenizer, arch, compute):
    import bitsandbytes as bnb

    from qlora_cli.train.loop import build_optimizer
    from qlora_cli.train.step import Precision, accumulate_gradients, clip_gradients

    folder = model_factory(arch, initializer_range=0.1, layers=1, hidden=32, **NO_DROPOUT.get(arch, {}))
    device = torch.device("cpu")
    micro = _batches(tokenizer, STEPS * ACCUMULATION, 2)
    pad = tokenizer.pad_token_id
    loss_tol, weight_tol = TOLERANCE[compute]

    def qlora_run(fused: bool) -> tuple[list[float], dict, dict, Any]:
        cfg = load_config(
            None,
            base_model=str(folder),
            datasets=[{"path": "x"}],
            bnb_4bit_compute_dtype=compute,
            lora_r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            lora_target_modules="all-linear",
            learning_rate=1e-2,
            fused_lora=fused,
            fused_cross_entropy=fused,
        )
        torch.manual_seed(0)
        model = load_base_model(cfg, device)
        inject_lora(model, cfg.lora)
        with torch.no_grad():
            for _, m in lora_layers(model):
                m.lora_B.weight.normal_(0, 0.02)  # non-zero B: the adapter shapes the first step's output
                m.fused = fused
        model.train()
        init = {n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone()) for n, m in lora_layers(model)}
        params = lora_parameters(model)
        optimizer = build_optimizer(cfg, params)
        precision = Precision.for_run(compute, device)
        losses = []
        for step in range(STEPS):
            window = [[[e] for e in mb] for mb in micro[step * ACCUMULATION : (step + 1) * ACCUMULATION]]
            total, n_targets, _ = accumulate_gradients(
                model,
                window,
                device=device,
                precision=precision,
                pad_id=pad,
                fused_cross_entropy=cfg.fused_cross_entropy,
            )
            clip_gradients(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total / n_targets)
        final = {n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone()) for n, m in lora_layers(model)}
        return losses, init, final, cfg

    plain_losses, init, plain_final, cfg = qlora_run(fused=False)

    peft_model, params = _peft_model(folder, cfg, init)
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=0.0)
    autocast = Precision.for_run(compute, device).autocast
    # the base model has no dropout left: two forwards in training mode agree exactly
    probe = {k: v for k, v in collate(micro[0], pad).items() if k != "labels"}
    with torch.no_grad(), autocast():
        assert torch.equal(peft_model(**probe).logits, peft_model(**probe).logits)
    peft_losses = []
    for step in range(STEPS):
        step_loss = 0.0
        for mb in micro[step * ACCUMULATION : (step + 1) * ACCUMULATION]:
            with autocast():
                loss = peft_model(**collate(mb, pad)).loss / ACCUMULATION
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peft_losses.append(step_loss)
    modules = dict(peft_model.base_model.model.named_modules())
    peft_final = {
        n: (modules[n].lora_A["default"].weight.detach(), modules[n].lora_B["default"].weight.detach()) for n in init
    }

    fused_losses, fused_init, fused_final, _ = qlora_run(fused=True)
    for n in init:  # the same seed gives the same initial adapter on both qlora paths
        assert torch.equal(init[n][0], fused_init[n][0]) and torch.equal(init[n][1], fused_init[n][1])

    assert peft_losses[-1] < 0.9 * peft_losses[0]  # it learns, so agreement is not agreement on nothing
    for name, losses, final in (("plain", plain_losses, plain_final), ("fused", fused_losses, fused_final)):
        rel = [abs(q - p) / p for q, p in zip(losses, peft_losses)]
        assert max(rel) < loss_tol, f"{name}: step losses differ from PEFT's by up to {max(rel):.2e}"
        for n in init:
            for i, ab in enumerate("AB"):
                moved = (peft_final[n][i] - init[n][i]).norm()
                diff = (final[n][i] - peft_final[n][i]).norm()
                assert diff < weight_tol * moved, (
                    f"{name}: {n}.lora_{ab} off by {float(diff / moved):.2e} of its update"
                )


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_config_applies_extra_keys_on_every_architecture(tokenizer, arch):
    """initializer_range and dropout keys reach every architecture's config (GPT-2, GPT-NeoX and OPT used to
    drop them silently, so a 'GPT-2 at initializer_range 0.1' was GPT-2 at its default 0.02)."""
    from qlora_cli.testing.tiny import tiny_config

    config = tiny_config(arch, tokenizer, initializer_range=0.1, **NO_DROPOUT.get(arch, {}))
    assert config.initializer_range == 0.1
    for key, value in NO_DROPOUT.get(arch, {}).items():
        assert getattr(config, key) == value
