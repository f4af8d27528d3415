"""The fast paths equal their plain references: outputs, gradients, and 20 training steps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_cli.config import LoRASettings, load_config
from qlora_cli.data.pipeline import IGNORE_INDEX
from qlora_cli.kernels.cross_entropy import fused_linear_cross_entropy
from qlora_cli.model.loading import load_base_model
from qlora_cli.model.lora import LoRALinear, inject_lora, lora_layers, lora_parameters, set_fused
from qlora_cli.train.loop import run_train
from qlora_cli.train.loss import loss_sum, supports_fused_cross_entropy

from .conftest import make_config, upper_rows, write_jsonl


def four_bit_linear(llama_dir, bias: bool = False) -> nn.Module:
    cfg = load_config(None, base_model=str(llama_dir), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32")
    return load_base_model(cfg, torch.device("cpu")).model.layers[0].mlp.up_proj


def run(layer: LoRALinear, x: torch.Tensor, fused: bool, seed: int = 0):
    layer.fused = fused
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both paths
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


def count_merges(monkeypatch) -> list[bool]:
    """Records, at every call of ``merged_weight`` (the rank-r update merged into the base weight), whether it
    merged."""
    from qlora_cli.kernels import lora_linear, swiglu

    calls: list[bool] = []
    original = lora_linear.merged_weight

    def spy(*args):
        w = original(*args)
        calls.append(w is not None)
        return w

    monkeypatch.setattr(lora_linear, "merged_weight", spy)
    monkeypatch.setattr(swiglu, "merged_weight", spy)
    return calls


@pytest.mark.parametrize("kind", ["linear", "linear-bias", "conv1d", "4bit"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rows", [(3, 5), (4, 40)])
def test_fused_lora_equals_plain(llama_dir, kind, dropout, rows, monkeypatch):
    """Output, input gradient and both adapter gradients equal the plain path's. With more rows than features,
    no dropout and float32, the update rides in the base matmul (x (W + s B A)^T, forward and backward): the
    same numbers, and a dense base weight is left as it was."""
    merges = count_merges(monkeypatch)
    torch.manual_seed(1)
    base = {
        "linear": lambda: nn.Linear(64, 48, bias=False),
        "linear-bias": lambda: nn.Linear(64, 48),
        "conv1d": lambda: Conv1D(48, 64),
        "4bit": lambda: four_bit_linear(llama_dir),
    }[kind]()
    layer = LoRALinear(base, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    x = torch.randn(*rows, layer.in_features)
    before = base.weight.detach().clone()
    plain, fused = run(layer, x, False), run(layer, x, True)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert plain[0].dtype == fused[0].dtype
    assert torch.equal(base.weight, before)
    # forward and the input's gradient merge exactly when the rows outnumber the features and nothing is dropped
    assert merges == ([] if dropout else [rows[0] * rows[1] > 64] * 2)


def test_fused_lora_under_bf16_autocast(llama_dir):
    layer = LoRALinear(four_bit_linear(llama_dir), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    x = torch.randn(2, 7, layer.in_features)
    outs = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(run(layer, x, fused))
    for a, b in zip(*outs):
        torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_cross_entropy_equals_plain(softcap):
    torch.manual_seed(0)
    B, T, H, V = 3, 9, 16, 50
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H) * 0.5
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[2, :] = IGNORE_INDEX  # a row with no target
    total, n = fused_linear_cross_entropy(hidden, weight, labels, softcap, chunk=4)  # chunks cut across rows
    total.backward()
    fused_grad = hidden.grad.clone()
    hidden.grad = None
    logits = hidden @ weight.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    shift = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    ref = F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fused_grad, hidden.grad, atol=1e-5, rtol=1e-4)


def test_fused_cross_entropy_reuses_its_cpu_buffer_without_mixing_calls():
    """On a CPU the chunk of logits lives in one buffer kept between calls (fresh memory is mapped page by page
    at every step otherwise): calls of different sizes, one after the other, each give the plain loss."""
    from qlora_cli.kernels import cross_entropy

    torch.manual_seed(0)
    weight = torch.randn(40, 8)
    buffers = []
    for rows in (7, 5, 12):  # smaller than the buffer, then larger: it grows
        hidden = torch.randn(1, rows + 1, 8, requires_grad=True)
        labels = torch.randint(0, 40, (1, rows + 1))
        total, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk=16)
        total.backward()
        buffers.append(cross_entropy._buffer[0])
        ref_hidden = hidden.detach().clone().requires_grad_(True)
        ref = F.cross_entropy(ref_hidden[0, :-1] @ weight.T, labels[0, 1:], reduction="sum")
        ref.backward()
        torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(hidden.grad, ref_hidden.grad, atol=1e-5, rtol=1e-4)
    assert buffers[0] is buffers[1] and buffers[2] is not buffers[1] and buffers[2].shape == (12, 40)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma2", "gpt2", "gpt_neox", "opt"])
def test_fused_loss_equals_plain_loss_on_real_models(model_factory, arch):
    cfg = load_config(
        None, base_model=str(model_factory(arch)), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32"
    )
    model = load_base_model(cfg, torch.device("cpu"))
    inject_lora(model, LoRASettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False))
    for _, m in lora_layers(model):
        with torch.no_grad():
            m.lora_B.weight.normal_(0, 0.2)
    assert supports_fused_cross_entropy(model)
    if arch == "gemma2":
        assert model.config.final_logit_softcapping  # the soft-capped head is exercised
    ids = torch.randint(6, 90, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for fused in (False, True):
        set_fused(model, fused)
        params = lora_parameters(model)
        for p in params:
            p.grad = None
        s, n = loss_sum(model, batch, fused=fused)
        s.backward()
        results.append((s.detach(), n, [p.grad.clone() for p in params]))
    (s0, n0, g0), (s1, n1, g1) = results
    assert n0 == n1 == 2 * 7
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert isinstance(model.get_output_embeddings(), nn.Linear)  # the head is back after the fused call


def test_lora_head_falls_back_to_the_plain_loss(model_factory):
    cfg = load_config(
        None, base_model=str(model_factory("llama")), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32"
    )
    model = load_base_model(cfg, torch.device("cpu"))
    inject_lora(model, LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["lm_head"], use_rslora=False))
    assert not supports_fused_cross_entropy(model)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_twenty_steps_fast_path_matches_plain_path(tmp_path, llama_dir, quiet_console, compute, monkeypatch):
    """Issue 7's numerics: same data and seed, 20 steps on the 4-bit base, losses within 1% relative (bf16
    autocast too, where the fused path shares one bf16 copy of each input between q, k and v). The fast run
    goes through every fused node (norms, MLP, the other LoRA layers, the loss), the plain run through none: nothing on
    the way (transformers' hub kernels at ``model.train()``, say) puts the model's own forwards back."""
    from qlora_cli.kernels import cross_entropy
    from qlora_cli.model import lora

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(80, seed=9))
    runs, calls = {}, {}

    def counted(name: str, kernel):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return kernel(*args, **kwargs)

        return call

    for name in ("fused_rms_norm", "fused_swiglu_mlp", "fused_lora_linear"):
        monkeypatch.setattr(lora, name, counted(name, getattr(lora, name)))
    loss = "fused_linear_cross_entropy"  # imported by the loss at each call
    monkeypatch.setattr(cross_entropy, loss, counted(loss, getattr(cross_entropy, loss)))
    for fast in (False, True):
        calls.clear()
        cfg = make_config(
            llama_dir,
            data,
            tmp_path / f"run-{fast}",
            bnb_4bit_compute_dtype=compute,
            max_steps=20,
            micro_batch_size=8,
            learning_rate=3e-3,
            lora_dropout=0.05,
            lora_target_modules="all-linear",
            fused_lora=fast,
            fused_cross_entropy=fast,
            gradient_checkpointing=True,
        )
        runs[fast] = run_train(cfg, console=quiet_console)
        if not fast:
            assert calls == {}
            continue
        # at every step: the loss once, each layer's MLP, its four attention projections and its two norms (and the
        # final one); the norm's probe in set_fused calls the kernel a few times and would not reach these counts
        layers = 2
        assert calls["fused_linear_cross_entropy"] >= 20, calls
        assert calls["fused_swiglu_mlp"] >= 20 * layers, calls
        assert calls["fused_lora_linear"] >= 20 * 4 * layers, calls
        assert calls["fused_rms_norm"] >= 20 * (2 * layers + 1), calls
    plain = [r["loss"] for r in runs[False].history if r["type"] == "train"]
    fast = [r["loss"] for r in runs[True].history if r["type"] == "train"]
    assert len(plain) == len(fast) == 20 and plain[-1] < plain[0]
    for a, b in zip(plain, fast):
        assert abs(a - b) <= 0.01 * abs(a), (a, b)
    a = load_file(runs[False].output_dir / "adapter_model.safetensors")
    b = load_file(runs[True].output_dir / "adapter_model.safetensors")
    for k in a:
        if compute == "float32":
            torch.testing.assert_close(b[k], a[k], atol=1e-3, rtol=1e-2)
        else:  # bf16 rounds differently on the two paths and Adam's normalised steps magnify it (<4% here)
            assert (b[k] - a[k]).norm() <= 0.1 * a[k].norm(), k


@pytest.mark.oldest
def test_offloaded_and_selective_checkpointing_give_the_same_step(tmp_path, llama_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=4))
    adapters = []
    for mode, every in ((False, 1), (True, 1), ("offload", 1), (True, 2)):
        cfg = make_config(
            llama_dir,
            data,
            tmp_path / f"run-{mode}-{every}",
            gradient_checkpointing=mode,
            checkpoint_every_n_layers=every,
            max_steps=2,
            optimizer="adamw_torch",
            lora_target_modules="all-linear",
        )
        run_train(cfg, console=quiet_console)
        adapters.append(load_file(tmp_path / f"run-{mode}-{every}" / "adapter_model.safetensors"))
    for other in adapters[1:]:
        for k in adapters[0]:
            torch.testing.assert_close(other[k], adapters[0][k], atol=1e-6, rtol=1e-5)


class _OnCuda:
    """Enough of a model for apply_liger to get past its device check without a GPU."""

    config = SimpleNamespace(model_type="llama")

    def parameters(self):
        yield SimpleNamespace(device=torch.device("cuda"))


@pytest.mark.parametrize(
    "error,broken",
    [
        (RuntimeError("Triton was built for CUDA 12, the driver has 13"), True),
        (ImportError("libcuda.so.1: cannot open shared object file"), True),
        (ModuleNotFoundError("No module named 'triton'", name="triton"), True),
        (ModuleNotFoundError("No module named 'liger_kernel'", name="liger_kernel"), False),
    ],
)
def test_a_liger_or_triton_that_fails_to_import_falls_back_with_a_warning(monkeypatch, error, broken):
    import warnings

    from qlora_cli.errors import ConfigError
    from qlora_cli.kernels import liger

    def failing_import(name):
        raise error

    monkeypatch.setattr(liger, "importlib", SimpleNamespace(import_module=failing_import))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert liger.apply_liger(_OnCuda(), "auto") is False
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if broken:  # installed but broken: said once, then training goes on without it
        assert messages == [
            f"liger_kernels: liger-kernel is installed but does not import ({type(error).__name__}: {error}); training without Liger kernels"
        ]
    else:  # simply not installed: nothing to say under auto
        assert messages == []
    with pytest.raises(ConfigError, match="liger_kernels: true, but liger-kernel is"):
        liger.apply_liger(_OnCuda(), "true")


def test_liger_falls_back_cleanly_off_gpu(model_factory):
    from qlora_cli.errors import ConfigError
    from qlora_cli.kernels.liger import apply_liger

    cfg = load_config(
        None, base_model=str(model_factory("llama")), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32"
    )
    model = load_base_model(cfg, torch.device("cpu"))
    before = {n: type(m) for n, m in model.named_modules()}
    assert apply_liger(model, "auto") is False and apply_liger(model, "false") is False
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(ConfigError, match="liger_kernels: true, but Liger kernels need a CUDA GPU"):
        apply_liger(model, "true")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (33, 70), (300, 513), (1, 7)])
def test_4bit_roundtrip_equals_bitsandbytes(dtype, quant_type, double_quant, shape, monkeypatch):
    """kernels.nf4 (lookup table, no packing) gives bitsandbytes' dequantize_4bit(quantize_4bit(W)): every
    bit for NF4, every value for FP4 (whose +0 and -0 codes bitsandbytes' own CPU kernels assign
    inconsistently). Shapes cover whole blocks, a short last block and odd rows; chunks of 3 blocks make
    the larger shapes take many chunks and a short last one."""
    import bitsandbytes.functional as bnbf

    from qlora_cli.kernels import nf4
    from qlora_cli.kernels.nf4 import roundtrip_4bit

    monkeypatch.setattr(nf4, "CHUNK", 3 * 64)

    torch.manual_seed(shape[0])
    w = torch.randn(shape) * torch.logspace(-3, 0, shape[1])  # blocks of very different scale
    w[0, :3] = 0.0
    w.view(-1)[100::997] = 1e-7  # values next to the zero code
    w = w.to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    expected = bnbf.dequantize_4bit(packed, state)
    mine = roundtrip_4bit(w, quant_type, double_quant)
    assert mine.dtype == expected.dtype and mine.shape == expected.shape
    assert torch.equal(mine, expected)
    if quant_type == "nf4":
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(mine.view(bits), expected.view(bits))
    assert not torch.equal(mine, w)  # it did quantize
    as_float32 = roundtrip_4bit(w, quant_type, double_quant, out_dtype=torch.float32)  # rounded, then widened
    assert as_float32.dtype == torch.float32 and torch.equal(as_float32, expected.float())


def test_4bit_roundtrip_lands_on_the_boundaries_like_bitsandbytes():
    """Values exactly on, and one float32 step either side of, every decision boundary."""
    import bitsandbytes.functional as bnbf

    from qlora_cli.kernels.nf4 import _sorted_code, roundtrip_4bit

    for quant_type in ("nf4", "fp4"):
        code = _sorted_code(quant_type)
        mids = (code[:-1] + code[1:]) / 2
        near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
        w = torch.cat([near, torch.tensor([1.0])])  # absmax 1: the scaled values are the values themselves
        w = torch.nn.functional.pad(w, (0, 64 - w.numel() % 64)).view(-1, 64)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
        torch.testing.assert_close(
            roundtrip_4bit(w, quant_type, False), bnbf.dequantize_4bit(packed, state), rtol=0, atol=0
        )


def test_fused_lora_saves_one_input_for_adapters_sharing_it():
    """q, k and v read the same float32 hidden state under bf16 autocast: backward keeps one bf16 copy of it
    and one byte mask per adapter, not a dropped bf16 copy per adapter; the input's gradient is still summed
    in float32, exactly as when each adapter casts its own copy."""
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(64, n, dtype=torch.bfloat16), r=4, alpha=8, dropout=0.1) for n in (64, 16, 16)]
    for layer in layers:
        layer.fused = True
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.3)
    x0 = torch.randn(2, 5, 64)

    def run(share: bool):
        x = x0.clone().requires_grad_(True)
        saved = []
        torch.manual_seed(1)  # the same dropout masks in both runs
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs = [layer(x if share else x.view_as(x)) for layer in layers]  # a view: its own cast
        weights = [torch.linspace(-1, 1, o.shape[-1]) for o in outs]
        sum((o.float() * w).sum() for o, w in zip(outs, weights)).backward()
        big = sorted(
            str(t.dtype) for t in {t.untyped_storage().data_ptr(): t for t in saved}.values() if t.numel() == x.numel()
        )
        return big, x.grad

    shared_saved, shared_grad = run(share=True)
    own_saved, own_grad = run(share=False)
    assert shared_saved == ["torch.bfloat16"] + ["torch.bool"] * 3
    assert own_saved == ["torch.bfloat16"] * 3 + ["torch.bool"] * 3
    assert shared_grad.dtype == torch.float32
    torch.testing.assert_close(shared_grad, own_grad, rtol=1e-6, atol=1e-7)


def test_4bit_roundtrip_of_non_finite_weights_is_bitsandbytes():
    """A block holding inf or NaN (a float32 checkpoint that overflows float16) gives what bitsandbytes gives."""
    import bitsandbytes.functional as bnbf

    from qlora_cli.kernels.nf4 import _tables, roundtrip_4bit

    w = torch.randn(4, 96)
    w[0, 5], w[2, 70], w[3, 95] = float("inf"), float("nan"), -float("inf")
    for quant_type in ("nf4", "fp4"):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
        expected = bnbf.dequantize_4bit(packed, state)
        torch.testing.assert_close(roundtrip_4bit(w, quant_type, True), expected, rtol=0, atol=0, equal_nan=True)
        as_float32 = roundtrip_4bit(w.bfloat16(), quant_type, True, out_dtype=torch.float32)
        assert as_float32.dtype == torch.float32 and not as_float32.isfinite().all()
        c, shift, boundary, value = _tables(quant_type)
        assert boundary.dtype == value.dtype == torch.float32 and boundary.numel() == (1 << 24) >> shift <= 8192


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (300, 514), (33, 70), (1, 7)])
def test_cpu_dequantize_into_the_shared_buffer_equals_bitsandbytes(dtype, quant_type, double_quant, shape):
    """dense_weight's CPU path (bitsandbytes' C kernel into a reused buffer, the scales dequantized once) gives
    dequantize_4bit's bits; odd widths go through bitsandbytes' function. A re-quantized weight (new scales
    under the same state object) is not served stale scales."""
    import bitsandbytes.functional as bnbf

    from qlora_cli.kernels.lora_linear import _cpu_dequantize, dense_weight

    torch.manual_seed(shape[1])
    w = (torch.randn(shape) * torch.logspace(-3, 0, shape[1])).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    packed.quant_state = state  # as bitsandbytes' Params4bit carries it
    base = SimpleNamespace(weight=packed)
    expected = bnbf.dequantize_4bit(packed, state)
    assert (_cpu_dequantize(packed, state) is None) == (shape[1] % 2 == 1)  # the C kernel takes even widths
    assert torch.equal(dense_weight(base, dtype), expected)
    assert torch.equal(dense_weight(base, dtype), expected)  # again, from the cached scales
    packed2, state2 = bnbf.quantize_4bit(w * 3, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    packed.copy_(packed2)
    state.absmax, state.state2, state.offset = state2.absmax, state2.state2, state2.offset
    assert torch.equal(dense_weight(base, dtype), bnbf.dequantize_4bit(packed2, state2))


@pytest.mark.parametrize("bias", [False, True])
def test_base_forward_equals_the_4bit_layer(llama_dir, bias):
    """Serving's base matmul (buffer dequantization) gives bitsandbytes' Linear4bit output exactly, in float32
    and under bf16 autocast; with gradients on it is the layer itself."""
    from qlora_cli.kernels.lora_linear import base_forward, quant_state_of

    layer = four_bit_linear(llama_dir)
    assert quant_state_of(layer) is not None
    if bias:
        layer.bias = nn.Parameter(torch.randn(layer.out_features))
    x = torch.randn(3, 2, layer.in_features)
    with torch.no_grad():
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                got, expected = base_forward(layer, x), layer(x)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
    x.requires_grad_(True)
    assert base_forward(layer, x).grad_fn is not None


def test_torch_compile_of_the_decoder_layers_equals_the_plain_model(model_factory, monkeypatch):
    """torch_compile: true compiles each decoder layer (norms, rotary, attention, SwiGLU fused by inductor), the
    LoRA layers (dropout on) running between the compiled pieces: outputs and LoRA gradients equal the plain
    model's within float32 rounding. Without a C++ compiler the run goes on uncompiled after one warning."""
    from torch._dynamo.utils import counters

    from qlora_cli.kernels import compile as compile_module
    from qlora_cli.kernels.compile import compile_layers

    folder = model_factory("llama", layers=1, initializer_range=0.1)
    cfg = load_config(None, base_model=str(folder), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32",
                      lora_target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.1)  # fmt: skip

    def build():
        torch.manual_seed(0)
        model = load_base_model(cfg, torch.device("cpu"))
        inject_lora(model, cfg.lora)
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, 0, 0.1)
        return model.train()

    def run(model):
        torch.manual_seed(1)  # the same dropout masks
        h = model.model(input_ids=torch.randint(0, 60, (3, 17))).last_hidden_state
        (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
        return h.detach(), [p.grad.clone() for p in lora_parameters(model)]

    plain = run(build())
    warnings = []
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert compile_layers(build(), torch.device("cpu"), warnings.append) == 0
    assert warnings == ["torch_compile: no C++ compiler found (g++, c++ or clang++; or set CXX); training uncompiled"]
    monkeypatch.undo()
    counters.clear()
    model = build()
    assert compile_layers(model, torch.device("cpu"), warnings.append, lambda m: isinstance(m, LoRALinear)) == 1
    compiled = run(model)
    assert counters["stats"]["unique_graphs"] > 0  # inductor did build graphs
    torch.testing.assert_close(compiled[0], plain[0], atol=1e-5, rtol=1e-5)
    scale = max(g.abs().max().item() for g in plain[1])
    assert scale > 1e-4  # the adapters get real gradients
    for a, b in zip(compiled[1], plain[1]):  # fused kernels sum in another order: float32 rounding, scaled
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=0)


def test_torch_compile_is_refused_with_gradient_checkpointing(tmp_path):
    from tests.test_cli import assert_user_error, run_cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: x\ndatasets: [{path: x}]\ntorch_compile: true\n")
    assert_user_error(run_cli("train", str(cfg)), "key 'torch_compile': not with gradient_checkpointing")
    assert load_config(None, base_model="x", datasets=[{"path": "x"}], torch_compile=True,
                       gradient_checkpointing=False).torch_compile  # fmt: skip


def _mlp_of(llama_dir, dropout: float, compute: str = "float32"):
    cfg = load_config(None, base_model=str(llama_dir), datasets=[{"path": "x"}], bnb_4bit_compute_dtype=compute,
                      lora_target_modules="all-linear", lora_dropout=dropout)  # fmt: skip
    torch.manual_seed(0)
    model = load_base_model(cfg, torch.device("cpu"))
    inject_lora(model, cfg.lora)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, 0, 0.1)
    return model.train(), model.model.layers[0].mlp


def _mlp_step(model, mlp, x, fused: bool, autocast: bool = False):
    set_fused(model, fused)
    params = [p for p in mlp.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    torch.manual_seed(3)  # the same dropout masks on both paths
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=autocast):
        y = mlp(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in params], saved


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rows", [(3, 11), (4, 40)])
def test_fused_swiglu_mlp_equals_plain(llama_dir, dropout, rows, monkeypatch):
    """The MLP as one node (gate, up, SiLU, product, down): the same output and gradients (input and all six
    adapter matrices) as three fused LoRA layers with autograd's SiLU and product between them, dropout masks
    included; and it keeps less for backward: silu(G) and h are recomputed, not saved. With more rows than
    features and no dropout, each of the six matmuls carries its adapter's update in the weight."""
    model, mlp = _mlp_of(llama_dir, dropout)
    assert mlp.__dict__.get("forward") is None  # not yet fused
    x = torch.randn(*rows, model.config.hidden_size)
    plain, saved_plain = _mlp_step(model, mlp, x, False)
    merges = count_merges(monkeypatch)
    fused, saved_fused = _mlp_step(model, mlp, x, True)
    assert merges == ([] if dropout else [rows[0] * rows[1] > model.config.intermediate_size] * 6)
    assert getattr(mlp, "_qlora_fused_mlp", False)
    assert len(plain) == 8
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    tokens, inter = rows[0] * rows[1], model.config.intermediate_size
    # two (tokens, intermediate) float32 tensors fewer: silu(G) and the product h
    assert sum(saved_plain) - sum(saved_fused) >= 2 * tokens * inter * 4
    # back to the plain forward when the fused flag is off
    set_fused(model, False)
    assert "forward" not in mlp.__dict__ and not hasattr(mlp, "_qlora_fused_mlp")


def test_fused_swiglu_mlp_under_bf16_autocast(llama_dir):
    model, mlp = _mlp_of(llama_dir, 0.1)
    x = torch.randn(2, 9, model.config.hidden_size)
    plain, _ = _mlp_step(model, mlp, x, False, autocast=True)
    fused, _ = _mlp_step(model, mlp, x, True, autocast=True)
    for a, b in zip(plain, fused):  # bf16 matmuls round differently from bitsandbytes': within 2% in norm
        assert a.dtype == b.dtype
        assert (b.float() - a.float()).norm() <= 0.02 * a.float().norm()


def test_fused_swiglu_mlp_steps_aside_for_a_disabled_or_merged_adapter(llama_dir):
    """Inside ``lora_disabled`` (preference tuning's reference pass) the fused MLP computes the base alone."""
    from qlora_cli.model.lora import lora_disabled

    model, mlp = _mlp_of(llama_dir, 0.0)
    x = torch.randn(2, 5, model.config.hidden_size)
    set_fused(model, True)
    with torch.no_grad():
        with lora_disabled(model):
            base_only = mlp(x)
        with_adapter = mlp(x)
        g, u, d = (getattr(mlp, n).base for n in ("gate_proj", "up_proj", "down_proj"))
        expected = d(F.silu(g(x)) * u(x))
    torch.testing.assert_close(base_only, expected, atol=1e-5, rtol=1e-5)
    assert (with_adapter - base_only).abs().max() > 1e-3


def _norm_step(norm: nn.Module, x: torch.Tensor, fused: bool):
    from qlora_cli.model.lora import _fused_norm_forward, is_rms_norm

    norm.weight.grad = None
    x = x.detach().clone().requires_grad_(True)
    saved: dict[int, int] = {}  # storage -> bytes: a tensor saved by two nodes counts once

    def pack(t):
        if not isinstance(t, nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    assert is_rms_norm(norm)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _fused_norm_forward(norm, x) if fused else type(norm).forward(norm, x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grad_w = None if norm.weight.grad is None else norm.weight.grad.clone()
    return y.detach(), x.grad, grad_w, sum(saved.values())


def _norm_class(name: str) -> type:
    import importlib

    arch = {"Llama": "llama", "Gemma": "gemma", "Olmo2": "olmo2"}[name]
    return getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), f"{name}RMSNorm")


@pytest.mark.parametrize("cls", ["Llama", "Gemma", "Olmo2"])  # x̂ cast then times w; (x̂ (1 + w)), (w x̂) cast
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 48), (2, 7, 3, 16)])  # hidden states; Qwen3's per-head q/k norm
@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_rms_norm_equals_transformers_norm(cls, dtype, shape, train_weight):
    """One node for transformers' RMSNorms (Llama's, Gemma's, OLMo-2's): the same output to the bit, the same
    gradients (input, and the weight when it trains), and never more kept for backward: x in its own dtype and one
    float per row. transformers' keeps a float32 copy of a bfloat16 x, and the normalized input when the weight
    trains."""
    torch.manual_seed(0)
    norm = _norm_class(cls)(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(shape[-1]))
    norm.weight.requires_grad_(train_weight)
    x = (2 * torch.randn(shape) + 0.3).to(dtype)
    y0, gx0, gw0, saved0 = _norm_step(norm, x, False)
    y1, gx1, gw1, saved1 = _norm_step(norm, x, True)
    assert y1.dtype == y0.dtype == dtype and torch.equal(y1, y0)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(gx1, gx0, **tol)
    assert gx1.abs().max() > 0.1
    if train_weight:
        assert gw1.dtype == dtype
        torch.testing.assert_close(gw1, gw0, **tol)
    else:
        assert gw0 is None and gw1 is None
    rows = x.numel() // x.shape[-1]
    assert saved1 == x.numel() * x.element_size() + rows * 4  # x and the float32 per-row scale, nothing else
    assert saved1 <= saved0
    if dtype == torch.bfloat16 or train_weight:
        assert saved0 - saved1 >= x.numel() * 2


def test_an_rms_norm_computing_something_else_keeps_its_own_forward():
    """The probe, not the class name, decides: a norm whose forward matches no fused variant is left alone."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qlora_cli.model.lora import is_rms_norm

    def forward(self, x):
        return LlamaRMSNorm.forward(self, x) * 2

    odd = type(
        "OddRMSNorm", (LlamaRMSNorm,), {"forward": forward, "__module__": "transformers.models.odd.modeling_odd"}
    )
    assert is_rms_norm(LlamaRMSNorm(16)) and not is_rms_norm(odd(16))
    model = nn.Sequential(odd(16), LlamaRMSNorm(16))
    set_fused(model, True)
    assert "forward" not in model[0].__dict__ and "forward" in model[1].__dict__


def test_set_fused_puts_the_models_norms_on_the_fused_node(llama_dir):
    """The whole model's logits and input gradients are the same with its norms fused; un-fusing, or fusing with
    ``norms=False`` (as torch_compile does), leaves the class's forward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qlora_cli.model.lora import _fused_norm_forward

    model, _ = _mlp_of(llama_dir, 0.0)
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    ids = torch.randint(0, model.config.vocab_size, (2, 9))

    def logits_and_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds).logits
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), embeds.grad

    set_fused(model, True, norms=False)
    assert not any("forward" in m.__dict__ for m in norms)
    plain = logits_and_grad()
    set_fused(model, True)
    model.eval()
    model.train()  # with transformers' hub kernels on, a mode change put the class's forward back
    assert all(m.__dict__["forward"].__func__ is _fused_norm_forward for m in norms)
    fused = logits_and_grad()
    torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], atol=1e-5, rtol=1e-4)
    assert plain[1].abs().max() > 1e-3
    set_fused(model, False)
    assert not any("forward" in m.__dict__ for m in norms)
