"""The step peak: qlora's own micro-batch step run on fake tensors (shapes, no data) under a dispatch-level
tracer that adds up every storage created and freed, with bitsandbytes' and CUDA's memory behaviour stood in."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qlora_cli.config import RunConfig
from qlora_cli.memory_plan.sizes import layer_period, linear_dims, meta_model, num_layers_of, quantized_module_names
from qlora_cli.model.loading import DTYPES, norms_output_compute_dtype

# ---------------------------------------------------------------------------------------------
# the traced step


class _StepTracer:
    """A dispatch mode that adds up the bytes of every tensor storage created under it, frees them when the
    storage dies (weakref on the storage), and keeps the peak, broken down by what was running (``tag``).

    Views and in-place results share an input's storage and are not counted again. ``.item()`` on a fake
    tensor (a data-dependent branch, a loss logged as a float) answers 1 / True: no data exists, and the
    answers follow the worst case (every position is a target, no padding)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return tracer.dispatch(func, args, kwargs or {})

        self.mode = Mode()
        self.live = 0
        self.peak = 0
        self.tag = "activations"
        self.by_tag: dict[str, int] = defaultdict(int)
        self.peak_by_tag: dict[str, int] = {}
        self._alive: dict[int, tuple[Any, int, str]] = {}

    def dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._pytree import tree_leaves

        fake = isinstance(args[0], FakeTensor) if args else False
        if fake and func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        if fake and func in _MASKED_INDEX_OPS and any(i is not None and i.dtype == torch.bool for i in args[1]):
            out = _masked_index_all_true(func, args)  # x[mask]: shape depends on the data; take every position
        elif fake and func in _HIDDEN_WORKSPACE:
            workspace = torch.empty_like(args[0])  # what the kernel allocates inside, alive while it runs
            self._add(workspace.untyped_storage(), workspace.untyped_storage()._cdata)
            out = func(*args, **kwargs)
            del workspace
        else:
            out = func(*args, **kwargs)
        inputs: set[int] | None = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._alive:
                continue
            if inputs is None:
                inputs = {
                    a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)
                }
            if key in inputs:
                continue
            self._add(st, key)
        return out

    def _add(self, storage: Any, key: int) -> None:
        n = storage.nbytes()
        tag = self.tag
        self._alive[key] = (weakref.ref(storage, self._freed(key)), n, tag)
        self.live += n
        self.by_tag[tag] += n
        if self.live > self.peak:
            self.peak = self.live
            self.peak_by_tag = dict(self.by_tag)

    def retag(self, tensor: torch.Tensor, tag: str) -> None:
        key = tensor.untyped_storage()._cdata
        entry = self._alive.get(key)
        if entry is not None and entry[2] != tag:
            ref, n, old = entry
            self._alive[key] = (ref, n, tag)
            self.by_tag[old] -= n
            self.by_tag[tag] += n

    def _freed(self, key: int) -> Any:
        def callback(_: Any) -> None:
            entry = self._alive.pop(key, None)
            if entry is not None:
                self.live -= entry[1]
                self.by_tag[entry[2]] -= entry[1]

        return callback

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        previous, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = previous


_TRACER: _StepTracer | None = None  # the active tracer, for the stand-in modules below

# Kernels that allocate a temporary the size of their input inside one op (invisible at the dispatch level,
# where the trace runs): logsumexp computes exp(x - max) into a new tensor before reducing it, on CPU and CUDA.
_HIDDEN_WORKSPACE = {torch.ops.aten.logsumexp.default}

_MASKED_INDEX_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


def _masked_index_all_true(func: Any, args: tuple) -> torch.Tensor:
    """Boolean-mask indexing on fake tensors, as if every mask entry were True (the fused loss gathers the
    target positions: the worst case is that every position is one). ``x[mask]`` -> a new
    (mask.numel(), *rest) tensor; ``index_put`` -> ``x`` itself, or a copy of it out of place."""
    x, indices = args[0], args[1]
    if func is torch.ops.aten.index.Tensor:
        mask = next(i for i in indices if i is not None)
        rest = x.shape[mask.ndim :]
        return torch.empty((mask.numel(), *rest), dtype=x.dtype, device=x.device)
    if func is torch.ops.aten.index_put.default:
        return torch.empty_like(x)
    return x


def _tag(name: str) -> Any:
    return _TRACER.tagged(name) if _TRACER is not None else contextlib.nullcontext()


class _Dequantized4bitMatmul(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit, memory-wise: the weight is dequantized into a temporary (out, in) tensor in
    the input's dtype for the matmul, in forward and again in backward; nothing is saved for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
        ctx.shape = (out_features, in_features)
        with _tag("dequantized weight"):
            w = torch.empty(ctx.shape, dtype=x.dtype, device=x.device)
        return nn.functional.linear(x, w)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        with _tag("dequantized weight"):
            w = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        return grad @ w, None, None


class _Linear4bitStandIn(nn.Linear):
    """Behaves as bitsandbytes ``Linear4bit.forward`` does: cast the input to the compute dtype, 4-bit matmul
    (with its bias), cast the output back to the input's dtype. Its weight is the packed uint8 tensor."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device: Any):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        packed = torch.empty((in_features * out_features + 1) // 2, 1, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.compute_dtype)
        out = _Dequantized4bitMatmul.apply(x, self.out_features, self.in_features)
        if self.bias is not None:
            out = out + self.bias
        return out.to(dtype)


class _FlashAttention(torch.autograd.Function):
    """Flash / memory-efficient attention, memory-wise: saves q, k, v, the output and a float32 log-sum-exp
    (B, H, T); backward allocates the three gradients and a float32 dq accumulator."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, H, T, D)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del accumulator
        return dq, dk, dv


class _DropoutWithBoolMask(torch.autograd.Function):
    """CUDA's fused dropout, memory-wise: the output and a 1-byte mask saved for backward (CPU's dropout saves
    a mask in the input's dtype instead)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(torch.empty(x.shape, dtype=torch.bool, device=x.device))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (mask,) = ctx.saved_tensors
        return torch.empty_like(grad)


@contextlib.contextmanager
def _cuda_behaviour() -> Iterator[None]:
    """Give fake CPU tensors CUDA's memory behaviour (a CPU-only torch cannot even index fake CUDA tensors):
    flash attention, dropout's 1-byte mask, and the casts CUDA autocast adds to CPU autocast's (norms and
    softmax in float32, einsum in the compute dtype). CPU autocast does the rest (matmuls in the compute
    dtype). The functions are swapped in ``torch.nn.functional`` for the trace only, so gradient
    checkpointing's recompute inside the backward sees them too."""
    F = nn.functional
    saved = {
        name: getattr(F, name)
        for name in ("scaled_dot_product_attention", "dropout", "layer_norm", "group_norm", "softmax", "log_softmax")
    }
    saved_einsum = torch.einsum

    def compute_dtype() -> torch.dtype | None:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def attention(query, key, value, *args, **kwargs):
        dtype = compute_dtype()
        if dtype is not None:
            query, key, value = (t.to(dtype) for t in (query, key, value))
        return _FlashAttention.apply(query, key, value)

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and torch.is_grad_enabled() and input.requires_grad:
            return _DropoutWithBoolMask.apply(input)
        return saved["dropout"](input, p, training, inplace)

    def in_float32(name):
        original = saved[name]

        def run(input, *args, **kwargs):
            if compute_dtype() is not None and input.is_floating_point():
                input = input.float()
                args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            return original(input, *args, **kwargs)

        return run

    def einsum(equation, *operands):
        dtype = compute_dtype()
        if dtype is not None:
            flat = operands[0] if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
            operands = tuple(t.to(dtype) if t.is_floating_point() else t for t in flat)
        return saved_einsum(equation, *operands)

    F.scaled_dot_product_attention = attention
    F.dropout = dropout
    for name in ("layer_norm", "group_norm", "softmax", "log_softmax"):
        setattr(F, name, in_float32(name))
    torch.einsum = einsum
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
        torch.einsum = saved_einsum


@contextlib.contextmanager
def _patched_for_trace(device_type: str) -> Iterator[None]:
    """Every function the trace swaps in torch, transformers and qlora's kernels, restored on exit: the mask
    check (``_unpadded_masks``), the fused LoRA kernel's dequantization (``_fused_lora_dequantization``) and,
    for a GPU plan, CUDA's memory behaviour (``_cuda_behaviour``)."""
    cuda = _cuda_behaviour() if device_type == "cuda" else contextlib.nullcontext()
    with _unpadded_masks(), _fused_lora_dequantization(device_type), cuda:
        yield


@contextlib.contextmanager
def _unpadded_masks() -> Iterator[None]:
    """transformers builds an explicit attention mask when it sees fake tensors (it cannot look at the values);
    a real all-ones mask lets it skip the mask and use causal attention. The trace models full, unpadded
    batches, so tell it the mask is not being traced."""
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - older transformers: a materialized mask, a slight over-estimate
        yield
        return
    saved = getattr(masking_utils, "is_tracing", None)
    if saved is None:
        yield
        return
    masking_utils.is_tracing = lambda *args, **kwargs: False
    try:
        yield
    finally:
        masking_utils.is_tracing = saved


def _quantize_stand_ins(model: nn.Module, cfg: RunConfig) -> None:
    """Swap the layers transformers would load in 4 bits for stand-ins with bitsandbytes' memory behaviour."""
    if not cfg.load_in_4bit:
        return
    compute = DTYPES[cfg.bnb_4bit_compute_dtype]
    for name in quantized_module_names(model):
        module = model.get_submodule(name)
        n_in, n_out = linear_dims(module)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        stand_in = _Linear4bitStandIn(n_in, n_out, module.bias is not None, compute, torch.device("meta"))
        setattr(parent, child, stand_in)


def _materialize(model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
    """Replace the meta model's tensors by fake ones on ``device``; 1-D frozen parameters become float32, as
    ``model.loading.load_base_model`` leaves them. No initialization runs (there is no data to initialize)."""
    compute = DTYPES[cfg.bnb_4bit_compute_dtype]
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in replaced:
                upcast = p.ndim == 1 and compute != torch.float32 and not p.requires_grad
                dtype = torch.float32 if upcast else p.dtype
                tensor = torch.empty(p.shape, dtype=dtype, device=device)
                replaced[id(p)] = nn.Parameter(tensor, requires_grad=p.requires_grad)
            module._parameters[key] = replaced[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                module._buffers[key] = torch.empty(b.shape, dtype=b.dtype, device=device)
    if compute != torch.float32:
        norms_output_compute_dtype(model)  # as model.upcast_small_parameters leaves a 16-bit run's norms
    for module in model.modules():
        if isinstance(module, _Linear4bitStandIn):  # what code that checks for a 4-bit weight looks at
            module.weight.quant_state = _StandInQuantState((module.out_features, module.in_features), compute)


@dataclass
class _StandInQuantState:
    shape: tuple[int, int]  # (out, in) of the dequantized weight
    dtype: torch.dtype  # the dtype it dequantizes to


@contextlib.contextmanager
def _fused_lora_dequantization(device_type: str) -> Iterator[None]:
    """``kernels.lora_linear.dense_weight`` for the 4-bit stand-ins: on CUDA bitsandbytes dequantizes into a
    buffer kept per weight shape (allocated once, reused by every layer and step); on CPU, which has no
    ``out=`` variant, into a new tensor each call."""
    try:
        from qlora_cli.kernels import lora_linear
    except ImportError:  # pragma: no cover - a qlora without the fused kernels
        yield
        return
    original = lora_linear.dense_weight
    buffers: dict[tuple, torch.Tensor] = {}

    def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        state = getattr(base.weight, "quant_state", None)
        if not isinstance(state, _StandInQuantState):
            return original(base, dtype)
        with _tag("dequantized weight"):
            if device_type == "cuda":
                key = (state.shape, state.dtype)
                if key not in buffers:
                    buffers[key] = torch.empty(state.shape, dtype=state.dtype, device=base.weight.device)
                w = buffers[key]
            else:
                w = torch.empty(state.shape, dtype=state.dtype, device=base.weight.device)
            return w if w.dtype == dtype else w.to(dtype)

    lora_linear.dense_weight = dense_weight
    try:
        yield
    finally:
        lora_linear.dense_weight = original


@dataclass
class StepTrace:
    peak: int  # bytes above resident memory at the step's peak
    by_tag: dict[str, int]  # what was live at the peak: activations, logits and loss, dequantized weight, gradients


def trace_step(
    model_config: Any,
    cfg: RunConfig,
    *,
    device_type: str,
    micro_batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    num_layers: int | None = None,
    train: bool = True,
) -> StepTrace:
    """Run one micro-batch of qlora's training step (or evaluation, ``train=False``) on fake tensors and return
    the peak of the memory it allocates on top of the resident model, adapter and optimizer state."""
    global _TRACER
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qlora_cli.data.pipeline import Example
    from qlora_cli.model.lora import inject_lora, lora_parameters, set_fused
    from qlora_cli.train.loss import evaluate_loss
    from qlora_cli.train.step import Precision, micro_batch_step

    device = torch.device("cpu")  # CUDA's behaviour is modelled on fake CPU tensors (_cuda_behaviour)
    if cfg.bnb_4bit_compute_dtype == "float16":  # same bytes as bfloat16, which CPU autocast handles everywhere
        cfg = cfg.model_copy(update={"bnb_4bit_compute_dtype": "bfloat16"})
    model = meta_model(model_config, cfg, num_layers)
    compute = DTYPES[cfg.bnb_4bit_compute_dtype]
    precision = Precision(device.type, compute, None)
    ids = [1] * seq_len
    examples = [Example(ids, ids) for _ in range(micro_batch_size)]
    tracer = _StepTracer()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    _quantize_stand_ins(model, cfg)
    inject_lora(model, cfg.lora)  # on the meta device: LoRA layers as training has them, float32, trainable
    set_fused(model, cfg.fused_lora, norms=not cfg.torch_compile)  # as run_train sets it
    with fake_mode, _patched_for_trace(device_type):
        _materialize(model, cfg, device)
        if gradient_checkpointing and train:
            _enable_checkpointing(model, cfg.checkpoint_every_n_layers)
        model.train(train)
        params = lora_parameters(model)
        if cfg.gradient_accumulation_steps > 1 and train:
            for p in params:  # gradients from the window's earlier micro-batches are resident (counted outside)
                p.grad = torch.zeros_like(p)
        head = model.get_output_embeddings()
        hooks = [model.register_forward_hook(_leave_model(tracer))]
        if head is not None:
            hooks.append(head.register_forward_pre_hook(_enter_loss_region(tracer)))
        for p in params:  # a gradient is computed under some tag; once accumulated it is a gradient
            hooks.append(p.register_post_accumulate_grad_hook(lambda p: tracer.retag(p.grad, "gradients")))
        _TRACER = tracer
        try:
            with tracer.mode:
                if train:  # one micro-batch of training: the step function train calls
                    loss, _ = micro_batch_step(
                        model,
                        [[e] for e in examples],
                        device=device,
                        precision=precision,
                        pad_id=0,
                        fused_cross_entropy=cfg.fused_cross_entropy,
                        loss_scale=1 / max(1, micro_batch_size * seq_len),
                    )
                    del loss
                else:
                    evaluate_loss(model, examples, micro_batch_size, 0, device, precision.autocast)
        finally:
            _TRACER = None
            for h in hooks:
                h.remove()
        by_tag = dict(tracer.peak_by_tag)
    return StepTrace(tracer.peak, {k: v for k, v in by_tag.items() if v})


def _enter_loss_region(tracer: _StepTracer) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        tracer.tag = "logits and loss"
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            # backward reaches this hook once the loss and head gradients are done: the rest is the layers
            hidden.register_hook(lambda grad: setattr(tracer, "tag", "activations"))

    return hook


def _enable_checkpointing(model: Any, every_n_layers: int) -> None:
    """As ``model.loading.enable_gradient_checkpointing`` (offloading is accounted for in ``traced_peak``)."""
    from qlora_cli.model.loading import enable_gradient_checkpointing

    enable_gradient_checkpointing(model, False, every_n_layers)


def _leave_model(tracer: _StepTracer) -> Any:
    """After the model's forward the loss runs (with the fused loss the head is part of it); backward leaves
    that region once the gradient of the model's output is computed."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        tracer.tag = "logits and loss"
        out = getattr(output, "logits", None)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: setattr(tracer, "tag", "activations"))

    return hook


def traced_peak(
    model_config: Any,
    cfg: RunConfig,
    *,
    device_type: str,
    micro_batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    train: bool = True,
) -> StepTrace:
    """``trace_step`` at the model's full depth, traced with one and two layer periods and extrapolated.

    With ``gradient_checkpointing: offload`` on a GPU the checkpointed layer inputs, the part that grows with
    depth, live in host memory: the GPU peak is then that of one period of layers."""
    depth = num_layers_of(model_config)
    period = layer_period(model_config)
    if gradient_checkpointing and train:  # checkpoint_every_n_layers > 1 repeats every n layers
        period = math.lcm(period, cfg.checkpoint_every_n_layers)
    offloaded = gradient_checkpointing and train and device_type == "cuda" and cfg.gradient_checkpointing == "offload"
    kwargs = dict(
        device_type=device_type,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        train=train,
    )
    if offloaded and depth > period:
        return trace_step(model_config, cfg, num_layers=period, **kwargs)
    if depth <= 2 * period:
        return trace_step(model_config, cfg, num_layers=depth or None, **kwargs)
    small = trace_step(model_config, cfg, num_layers=period, **kwargs)
    large = trace_step(model_config, cfg, num_layers=2 * period, **kwargs)
    periods = depth / period - 1  # how many more periods than `small` the full model has
    tags = set(small.by_tag) | set(large.by_tag)
    by_tag = {
        t: int(round(small.by_tag.get(t, 0) + periods * (large.by_tag.get(t, 0) - small.by_tag.get(t, 0))))
        for t in tags
    }
    peak = int(round(small.peak + periods * (large.peak - small.peak)))
    return StepTrace(peak, {k: v for k, v in by_tag.items() if v})
