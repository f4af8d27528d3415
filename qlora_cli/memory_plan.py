"""How much memory a training run will take, predicted from the config alone, before any weight is loaded.

    resident  = 4-bit weights + their quantization constants + 16-bit embeddings/head + float32 norms/biases
              + adapter (float32) + optimizer state (+ gradients when they live across micro-batches)
    step peak = the largest amount of memory a forward + backward of one micro-batch holds on top of that
              (saved activations, logits and loss buffers, dequantized weights, gradients as they appear)
    tensor peak = resident + step peak        (torch.cuda.max_memory_allocated on a GPU; measured on CPU)
    GPU total   = tensor peak + CUDA context + caching-allocator reserve

The resident parts are exact byte counts from the model's shapes. The step peak is not a formula: qlora's own
training step (collate -> ``loss.loss_sum`` -> the transformers model with qlora's LoRA layers -> backward)
runs on *fake* tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data, no memory), under
the same autocast, gradient checkpointing and dropout, while a dispatch-level tracer adds up every tensor
storage created and freed. So the plan follows whatever the training code does: a chunked loss added to
``loss.py`` shows up in the plan without touching this file. (The micro-batch step is ``train.micro_batch_step``
itself: collate, autocast, ``loss_sum`` with ``fused_cross_entropy``, backward, with the LoRA layers' ``fused``
flag and gradient checkpointing set as ``train`` sets them.) The approximations:

- the base's 4-bit linear layers run as a stand-in with bitsandbytes' memory behaviour (4-bit weights resident,
  the weight dequantized into a temporary in forward and again in backward, nothing saved for backward; the
  fused LoRA kernel's per-shape dequantization buffer on CUDA);
- the step is traced with 1 and 2 decoder layers (or one and two periods of a repeating layer pattern) and
  extrapolated linearly to the real depth, which is exact when the layers repeat (each one saves the same);
- data-dependent values are the worst case: full-length, unpadded batches, every position a target;
- kernels that allocate inside one op (``logsumexp``) get that workspace added; others are not seen.

For a GPU the trace still runs on fake CPU tensors (a CPU-only torch cannot index fake CUDA ones) with CUDA's
memory behaviour swapped in (``_cuda_behaviour``): flash attention (saves the output and a float32
log-sum-exp, nothing quadratic), dropout's 1-byte mask, autocast's float32 norms and softmax. For CPU it runs
the CPU kernels as they are, which is what the tests compare against measured CPU runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlora_cli.config import RunConfig
from qlora_cli.errors import ConfigError, ModelError, QLoRAError
from qlora_cli.model import DTYPES

# -- GPU-only constants (not part of the CPU comparison) -------------------------------------------------
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + cuBLAS/cuDNN handles and workspaces: ~0.3-0.6 GiB on recent GPUs
ALLOCATOR_RESERVE = 0.08  # caching-allocator rounding and fragmentation: reserved exceeds allocated by ~5-10%

# -- bitsandbytes storage layout ----------------------------------------------------------------------
NF4_BLOCKSIZE = 64  # values per absmax block (bitsandbytes' 4-bit default)
NESTED_BLOCKSIZE = 256  # absmax values per second-level block with double quantization
OPTIM_BLOCKSIZE = 256  # 8-bit optimizer state block size
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps float32 optimizer state for tensors with fewer elements


# ---------------------------------------------------------------------------------------------
# the model skeleton (meta device: shapes, no memory)


def load_model_config(cfg: RunConfig) -> Any:
    """The transformers config of ``cfg.base_model`` from local files only (a folder, or the HF cache)."""
    from transformers import AutoConfig

    from qlora_cli.model import check_model_folder, is_local, quiet_libraries

    quiet_libraries()
    name = cfg.base_model
    if is_local(name):
        check_model_folder(name)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        if not is_local(name):
            raise ModelError(
                f"base_model {name} is not a local folder and its config is not in the Hugging Face cache; "
                "inspect reads local files only (download it first, e.g. `huggingface-cli download "
                f"{name} config.json`)"
            ) from None
        raise ModelError(f"cannot read the model config of {name}: {str(e).splitlines()[0]}") from None


def meta_model(model_config: Any, cfg: RunConfig, num_layers: int | None = None) -> nn.Module:
    """The model built from its config on the meta device, in the compute dtype (no weights, no memory)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    if num_layers is not None:
        _truncate_layers(config, num_layers)
    config.use_cache = False
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.bnb_4bit_compute_dtype]}
    if cfg.attn_implementation is not None:
        # flash_attention_2 needs its package; sdpa has the same memory behaviour (saves only the output)
        kwargs["attn_implementation"] = "eager" if cfg.attn_implementation == "eager" else "sdpa"
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ValueError as e:
        if kwargs.pop("attn_implementation", None) == "sdpa":  # a model without sdpa: its default attention
            return meta_model(model_config, cfg.model_copy(update={"attn_implementation": None}), num_layers)
        raise ModelError(f"cannot build {type(config).__name__} as a causal LM: {str(e).splitlines()[0]}") from None


def num_layers_of(model_config: Any) -> int:
    return int(getattr(model_config, "num_hidden_layers", 0) or 0)


def _truncate_layers(config: Any, n: int) -> None:
    config.num_hidden_layers = n
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = layer_types[:n]


def layer_period(model_config: Any) -> int:
    """The length of the repeating pattern of decoder layers (2 for alternating sliding/global attention)."""
    layer_types = getattr(model_config, "layer_types", None)
    if not isinstance(layer_types, list) or not layer_types:
        return 1
    n = len(layer_types)
    for p in range(1, n + 1):
        if all(layer_types[i] == layer_types[i % p] for i in range(n)):
            return p
    return n


def quantized_module_names(model: nn.Module) -> list[str]:
    """The linear layers transformers replaces with bitsandbytes ``Linear4bit`` when loading in 4 bits: every
    ``nn.Linear``/``Conv1D`` except the output head, tied weights and the module of the last parameter
    (the rule of ``transformers.quantizers.base.get_keys_to_not_convert``)."""
    from qlora_cli.lora import Conv1D, output_head

    head = output_head(model)
    params = list(model.named_parameters())
    skip = {params[-1][0].rsplit(".", 1)[0]} if params else set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for key, value in dict(tied).items():
        skip.add(str(key).removesuffix(".weight"))
        skip.add(str(value).removesuffix(".weight"))
    names = []
    for name, module in model.named_modules():
        if not name or module is head:
            continue
        if type(module) is not nn.Linear and not (bool(Conv1D) and isinstance(module, Conv1D)):
            continue
        if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip):
            continue
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# resident memory: exact byte counts from shapes


def nf4_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed 4-bit weight bytes, quantization-constant bytes) of one bitsandbytes 4-bit weight.

    Per weight: the packed values, uint8 (two per byte); ``code`` (16 float32); with double quantization the
    per-block absmax is uint8 plus float32 second-level absmax per 256 blocks, a 256-entry float32 code and a
    float32 offset; without it the absmax is float32 per block. That is ~0.127 bit per parameter of constants
    with double quantization and 0.5 bit without.
    """
    blocks = -(-numel // NF4_BLOCKSIZE)
    packed = (numel + 1) // 2
    code = 16 * 4
    if double_quant:
        constants = blocks + -(-blocks // NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4 + code
    else:
        constants = blocks * 4 + code
    return packed, constants


@dataclass
class TargetInfo:
    name: str
    in_features: int
    out_features: int

    @property
    def suffix(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def linear_dims(module: nn.Module) -> tuple[int, int]:
    from qlora_cli.lora import linear_shape

    n_in, n_out, _ = linear_shape(module)
    return n_in, n_out


@dataclass
class WeightBytes:
    quantized_4bit: int = 0  # packed NF4/FP4 values
    quant_constants: int = 0  # absmax, codes, offsets
    unquantized_16bit: int = 0  # embeddings, output head, unquantized linear layers (compute dtype)
    small_float32: int = 0  # norms and biases (float32 under 16-bit compute), buffers
    params_total: int = 0  # parameter count of the base (unquantized count, tied weights once)
    params_quantized: int = 0

    @property
    def total(self) -> int:
        return self.quantized_4bit + self.quant_constants + self.unquantized_16bit + self.small_float32


def weight_bytes(model: nn.Module, cfg: RunConfig) -> WeightBytes:
    """Exact bytes of the base as ``model.load_base_model`` holds it, computed from the meta model's shapes."""
    compute = DTYPES[cfg.bnb_4bit_compute_dtype]
    upcast = compute != torch.float32  # model.upcast_small_parameters: 1-D params to float32
    out = WeightBytes()
    quantized = set(quantized_module_names(model)) if cfg.load_in_4bit else set()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            numel = p.numel()
            out.params_total += numel
            if module_name in quantized and pname == "weight":
                packed, constants = nf4_bytes(numel, cfg.bnb_4bit_use_double_quant)
                out.quantized_4bit += packed
                out.quant_constants += constants
                out.params_quantized += numel
            elif p.ndim == 1:
                out.small_float32 += numel * (4 if upcast else p.element_size())
            else:
                out.unquantized_16bit += numel * compute.itemsize
    for b in model.buffers():
        out.small_float32 += b.numel() * b.element_size()
    return out


def adapter_shapes(targets: list[TargetInfo], r: int) -> list[tuple[int, ...]]:
    """Shapes of the adapter tensors: A (r, in) and B (out, r) per target."""
    shapes: list[tuple[int, ...]] = []
    for t in targets:
        shapes += [(r, t.in_features), (t.out_features, r)]
    return shapes


def optimizer_state_bytes(optimizer: str, shapes: list[tuple[int, ...]]) -> int:
    """Exact bytes of the optimizer state over float32 parameters of these shapes, after the first step.

    adamw_torch: exp_avg + exp_avg_sq (float32) and a float32 ``step`` tensor per parameter.
    bitsandbytes 32-bit: state1 + state2 (float32).
    bitsandbytes 8-bit: state1 + state2 (uint8) + a float32 absmax per 256 values each, two shared 256-entry
    float32 quantization maps; tensors under 4096 elements keep float32 states (bitsandbytes' min_8bit_size).
    Paged optimizers hold the same bytes (in CUDA unified memory, which stays on the GPU unless it runs short).
    """
    total = 0
    any_8bit = False
    for shape in shapes:
        n = math.prod(shape)
        if optimizer == "adamw_torch":
            total += 2 * n * 4 + 4
        elif optimizer == "paged_adamw_32bit":
            total += 2 * n * 4
        elif n < MIN_8BIT_SIZE:
            total += 2 * n * 4
        else:
            any_8bit = True
            total += 2 * n + 2 * -(-n // OPTIM_BLOCKSIZE) * 4
    if any_8bit:
        total += 2 * 256 * 4
    return total


# ---------------------------------------------------------------------------------------------
# measured counterparts (tests and the benchmark compare the plan against these)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a loaded model holds: parameters, buffers and bitsandbytes quant-state tensors
    (absmax, codes, offsets, second-level state), each storage once."""
    storages: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages[st.data_ptr() or id(st)] = max(storages.get(st.data_ptr(), 0), t.numel() * t.element_size())

    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(t)
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    for b in model.buffers():
        add(b)
    return sum(storages.values())


def measured_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (shared tensors once)."""
    storages: dict[int, int] = {}
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    return sum(storages.values())


def measure_training_peak(cfg: RunConfig) -> dict[str, int]:
    """Run ``train.train(cfg)`` (on CPU) and measure its peak tensor memory, to compare with ``plan_memory``.

    What "measured" means on CPU: the bytes of every tensor the model holds (parameters incl. the adapter,
    buffers, quant state: ``resident_bytes``), plus the peak, from the model's first forward to the end of the
    run, of the bytes torch's CPU allocator has handed out beyond what it had at that moment
    (``torch.profiler`` memory events, recorded from that moment: every allocation and free through c10's
    allocator, kernel temporaries included). Loading is excluded: on a GPU it is host memory, and profiling it
    is slow. Returns resident, step_peak and tensor_peak in bytes.
    """
    from rich.console import Console
    from torch.profiler import ProfilerActivity, profile

    from qlora_cli.train import train

    model: list[nn.Module] = []
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def first_forward(module: nn.Module, args: Any) -> None:
        if not model:  # pre-hooks run outermost first: this is the whole model
            model.append(module)
            prof.start()  # only what is allocated from here on is reported, frees of older blocks are not

    handle = nn.modules.module.register_module_forward_pre_hook(first_forward)
    try:
        train(cfg, force=True, console=Console(quiet=True))
    finally:
        handle.remove()
        if model:
            prof.stop()
    # counted after the run: during a forward the fused loss has the head taken off the model
    resident = resident_bytes(model[0])
    memory = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = step = 0
    for _, n in memory:
        running += n
        step = max(step, running)
    return {"resident": resident, "step_peak": step, "tensor_peak": resident + step}


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
    ``model.load_base_model`` leaves them. No initialization runs (there is no data to initialize)."""
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

    from qlora_cli.data import Example
    from qlora_cli.lora import inject_lora, lora_parameters, set_fused
    from qlora_cli.loss import evaluate_loss
    from qlora_cli.train import Precision, micro_batch_step

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
    cuda_behaviour = _cuda_behaviour() if device_type == "cuda" else contextlib.nullcontext()
    _quantize_stand_ins(model, cfg)
    inject_lora(model, cfg.lora)  # on the meta device: LoRA layers as training has them, float32, trainable
    set_fused(model, cfg.fused_lora)  # as train() sets it
    with fake_mode, _unpadded_masks(), _fused_lora_dequantization(device_type):
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
            with tracer.mode, cuda_behaviour:
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
    """As ``model.enable_gradient_checkpointing`` (offloading is accounted for in ``traced_peak``)."""
    from qlora_cli.model import enable_gradient_checkpointing

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


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class Component:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    device: str  # "cuda" (one GPU) or "cpu"
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool | str  # True, False or "offload"
    resident: list[Component]
    step: list[Component]  # live at the peak of one micro-batch's forward + backward
    tensor_peak: int  # resident + step peak: what torch.cuda.max_memory_allocated reports
    overhead: list[Component]  # GPU only: CUDA context and allocator reserve
    total: int  # what the GPU must have
    activations_with_checkpointing: int | None  # the step peak with and without gradient checkpointing
    activations_without_checkpointing: int | None
    eval_peak: int | None = None  # tensor peak during evaluation, when there is eval data
    gpu_memory: int | None = None
    fits: bool | None = None
    max_micro_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def plan_memory(
    cfg: RunConfig,
    model_config: Any | None = None,
    *,
    device_type: str | None = None,
    gpu_memory: int | None = None,
    targets: list[TargetInfo] | None = None,
    search_batch: bool = True,
) -> MemoryPlan:
    """The memory plan of ``cfg`` for one device ("cuda" unless the config says ``device: cpu``)."""
    model_config = model_config if model_config is not None else load_model_config(cfg)
    device_type = device_type or ("cpu" if cfg.device == "cpu" else "cuda")
    if cfg.bnb_4bit_compute_dtype == "float16" and device_type == "cpu":
        raise ConfigError("bnb_4bit_compute_dtype: float16 needs a GPU; use bfloat16 or float32 on CPU")
    skeleton = meta_model(model_config, cfg)
    if targets is None:
        targets = target_infos(skeleton, cfg)
    weights = weight_bytes(skeleton, cfg)
    shapes = adapter_shapes(targets, cfg.lora_r)
    adapter = sum(math.prod(s) for s in shapes) * 4
    optimizer = optimizer_state_bytes(cfg.optimizer, shapes)
    # collate pads to a multiple of 8 on CUDA; the plan assumes every micro-batch is padded to sequence_len
    seq_len = -(-cfg.sequence_len // 8) * 8 if device_type == "cuda" else cfg.sequence_len
    resident = [
        Component("weights_4bit", "4-bit weights", weights.quantized_4bit, f"{weights.params_quantized:,} params"),
        Component(
            "quant_constants",
            "quantization constants",
            weights.quant_constants,
            "double quantization" if cfg.bnb_4bit_use_double_quant else "float32 absmax per 64",
        ),
        Component(
            "unquantized",
            f"unquantized weights ({cfg.bnb_4bit_compute_dtype})",
            weights.unquantized_16bit,
            "embeddings, output head",
        ),
        Component(
            "small_float32",
            "norms, biases, buffers",
            weights.small_float32,
            "float32" if cfg.bnb_4bit_compute_dtype != "float32" else "",
        ),
        Component("adapter", "LoRA adapter (float32)", adapter, f"{adapter // 4:,} params"),
        Component("optimizer", f"optimizer state ({cfg.optimizer})", optimizer, ""),
    ]
    if cfg.gradient_accumulation_steps > 1:
        resident.append(Component("gradients", "gradients (float32)", adapter, "kept across micro-batches"))
    resident = [c for c in resident if c.bytes or c.key in ("adapter", "optimizer")]
    resident_total = sum(c.bytes for c in resident)

    def step(batch: int, checkpointing: bool, train: bool = True) -> StepTrace:
        return traced_peak(
            model_config,
            cfg,
            device_type=device_type,
            micro_batch_size=batch,
            seq_len=seq_len,
            gradient_checkpointing=checkpointing,
            train=train,
        )

    has_eval = bool(cfg.eval_datasets) or cfg.val_set_size > 0
    trace_error = None
    try:
        main = step(cfg.micro_batch_size, bool(cfg.gradient_checkpointing))
        other = step(cfg.micro_batch_size, not cfg.gradient_checkpointing)
        eval_trace = step(cfg.eval_batch_size or cfg.micro_batch_size, False, train=False) if has_eval else None
    except QLoRAError:
        raise
    except Exception as e:  # an architecture fake tensors cannot run (e.g. data-dependent expert routing)
        trace_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        main = other = StepTrace(0, {})
        eval_trace = None
    # the optimizer step holds the gradients and a few temporaries of the adapter's size
    optimizer_phase = 3 * adapter if cfg.gradient_accumulation_steps == 1 else 2 * adapter
    step_peak = max(main.peak, optimizer_phase)
    labels = {
        "activations": "activations",
        "logits and loss": "logits and loss buffers",
        "dequantized weight": "dequantized weight (temporary)",
        "gradients": "gradients (float32)",
    }
    step_components = [
        Component(k.replace(" ", "_"), labels.get(k, k), v) for k, v in sorted(main.by_tag.items(), key=_tag_order)
    ]
    tensor_peak = resident_total + step_peak
    with_gc, without_gc = (main, other) if cfg.gradient_checkpointing else (other, main)

    def overhead_for(peak: int) -> list[Component]:
        if device_type != "cuda":
            return []
        return [
            Component("cuda_context", "CUDA context and workspaces", CUDA_CONTEXT_BYTES, "constant"),
            Component(
                "allocator_reserve",
                "allocator reserve",
                int(peak * ALLOCATOR_RESERVE),
                f"{ALLOCATOR_RESERVE:.0%} of the tensor peak",
            ),
        ]

    overhead = overhead_for(tensor_peak)
    total = tensor_peak + sum(c.bytes for c in overhead)
    eval_peak = None
    if eval_trace is not None:
        eval_peak = resident_total - (adapter if cfg.gradient_accumulation_steps > 1 else 0) + eval_trace.peak
        if eval_peak > tensor_peak:
            total = eval_peak + sum(c.bytes for c in overhead_for(eval_peak))
    plan = MemoryPlan(
        device=device_type,
        micro_batch_size=cfg.micro_batch_size,
        seq_len=seq_len,
        gradient_checkpointing=cfg.gradient_checkpointing,
        resident=resident,
        step=step_components,
        tensor_peak=tensor_peak,
        overhead=overhead,
        total=total,
        activations_with_checkpointing=with_gc.peak,
        activations_without_checkpointing=without_gc.peak,
        eval_peak=eval_peak,
        gpu_memory=gpu_memory,
    )
    plan.notes.append(f"assumes every micro-batch is {seq_len} tokens long (the worst case); shorter batches take less")
    if trace_error is not None:
        plan.activations_with_checkpointing = plan.activations_without_checkpointing = None
        plan.notes.append(
            f"could not trace this architecture's training step on fake tensors ({trace_error}); "
            "activations, logits and loss buffers are missing from this plan"
        )
    if gpu_memory is not None:
        plan.fits = total <= gpu_memory
        if search_batch and trace_error is None:
            plan.max_micro_batch_size = _largest_batch(plan, resident_total, main, step, gpu_memory)
    return plan


def _tag_order(item: tuple[str, int]) -> int:
    order = ["activations", "logits and loss", "dequantized weight", "gradients"]
    return order.index(item[0]) if item[0] in order else len(order)


def _largest_batch(plan: MemoryPlan, resident: int, at_batch: StepTrace, step: Any, budget: int) -> int:
    """The largest micro_batch_size whose total fits ``budget``. The step peak is affine in the batch size
    (every activation, logit and loss buffer has a batch dimension; the dequantized-weight temporaries do not),
    so a second trace at one more example gives the slope and the answer in closed form."""
    b0 = plan.micro_batch_size
    slope = max(step(b0 + 1, bool(plan.gradient_checkpointing)).peak - at_batch.peak, 1)
    fixed = at_batch.peak - slope * b0  # the part of the step peak that does not grow with the batch
    if plan.device == "cuda":  # total = (resident + step) * (1 + reserve) + context
        room = (budget - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_RESERVE) - resident - fixed
    else:
        room = budget - resident - fixed
    return max(0, int(room // slope))


# ---------------------------------------------------------------------------------------------
# targets


def target_infos(model: nn.Module, cfg: RunConfig) -> list[TargetInfo]:
    """The modules LoRA will wrap, with their (in, out) features. Raises ``ModelError`` like ``inject_lora``."""
    from qlora_cli.lora import match_targets

    return [TargetInfo(n, *linear_dims(model.get_submodule(n))) for n in match_targets(model, cfg.lora_target_modules)]


# ---------------------------------------------------------------------------------------------
# sizes


def format_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
