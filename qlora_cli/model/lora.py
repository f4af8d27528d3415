"""Our LoRA layer, target matching and injection, and the delta/merge math as pure functions.

    y = W x + (α / r) · B (A dropout(x))          (α / √r with rsLoRA)

DoRA (``use_dora``) adds a trained magnitude ``m`` per output row: the layer's weight is
``m / ‖W + s·BA‖_row · (W + s·BA)``, the norm treated as a constant in backward (the DoRA paper's section 4.3,
as PEFT does); ``m`` starts at ``‖W + s·BA‖_row``, so a fresh adapter changes nothing either.

``A`` is (r, in) Kaiming-uniform, ``B`` is (out, r) zeros, so a fresh adapter changes nothing. The adapter
weights are float32 master weights whatever the base's dtype: a 4-bit base cannot hold a gradient and a
bfloat16 adapter loses small updates. ``base`` may be ``nn.Linear``, a bitsandbytes ``Linear4bit`` (a subclass
of ``nn.Linear``) or GPT-2's ``Conv1D``, whose weight is stored transposed, (in, out).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlora_cli.config import LoRASettings, lora_scaling
from qlora_cli.errors import ModelError
from qlora_cli.kernels.dropout import dropout_mask, dropout_rate
from qlora_cli.kernels.lora_linear import dense_weight, fused_lora_linear
from qlora_cli.kernels.rms_norm import fused_rms_norm
from qlora_cli.kernels.swiglu import fused_swiglu_mlp, swiglu_supported
from qlora_cli.model.loading import module_device

try:  # transformers' GPT-2 style linear layer, weight (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()  # type: ignore[assignment,misc]


# ---------------------------------------------------------------------------------------------
# pure math


def lora_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """scaling · B @ A in float32: (out, in), or (in, out) for a Conv1D base (``fan_in_fan_out``)."""
    delta = (lora_B.float() @ lora_A.float()) * scaling  # (out, r) @ (r, in) -> (out, in)
    return delta.T if fan_in_fan_out else delta


def dora_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """DoRA's effective weight, float32 (out, in): ``m / ‖W + s·BA‖_row · (W + s·BA)``."""
    combined = weight.float() + lora_delta(lora_A, lora_B, scaling)
    return combined * (magnitude.float() / combined.norm(dim=1))[:, None]


def merge_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """W + scaling · B @ A, computed in float32 and returned in float32 (the caller picks the output dtype)."""
    return weight.float() + lora_delta(lora_A, lora_B, scaling, fan_in_fan_out)


# ---------------------------------------------------------------------------------------------
# the layer


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like layer."""
    if isinstance(module, LoRALinear):  # the layer it wraps
        return module.in_features, module.out_features, module.fan_in_fan_out
    if isinstance(module, nn.Linear):  # includes bnb Linear4bit, whose .weight is packed but attrs are true
        return module.in_features, module.out_features, False
    if bool(Conv1D) and isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return n_in, n_out, True
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes 4-bit layers (their weight is packed and cannot be merged in place)."""
    weight = getattr(module, "weight", None)
    return weight is not None and hasattr(weight, "quant_state")


class LoRADropout(nn.Dropout):
    """Dropout on the adapter's input, drawn by ``dropout_mask`` (the fused path draws the same mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep_scale = 1.0 / (1.0 - dropout_rate(self.p, x.device))
        return torch.where(dropout_mask(x.shape, self.p, x.device), 0.0, x).mul_(keep_scale)


class AroundLinear(nn.Module):
    """A module wrapping a frozen linear layer ``base``; its weight and bias read through, so code that reads
    ``module.weight`` keeps working."""

    base: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)


class LoRALinear(AroundLinear):
    """A frozen linear layer plus a trainable low-rank update: ``y = base(x) + scaling · B(A(dropout(x)))``."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
    ):
        super().__init__()
        in_features, out_features, fan_in_fan_out = linear_shape(base)
        device = module_device(base)
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = in_features, out_features
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.use_dora = use_dora
        if use_dora:  # PEFT's name and place: <module>.lora_magnitude_vector
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device, dtype=torch.float32))
        self.merged = False
        self.disabled = False
        # preference tuning's reference: frozen (A, B) copies (None: the base alone), used inside ``lora_reference``
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.use_reference = False
        self.fused = False  # one autograd node for base + adapter (kernels.lora_linear); same numbers
        # PiSSA / OLoRA (model.starts): a frozen copy (A₀, B₀) of the start; the layer computes
        # base(x) − s·B₀A₀x + s·BAx, so the 4-bit base is never re-quantized. None: nothing taken off.
        self.offset: tuple[torch.Tensor, torch.Tensor] | None = None
        self.init = init
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_A.weight.device.type == "meta":
            return
        if self.init == "gaussian":  # PEFT's gaussian: A ~ N(0, 1/r²)
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:  # nn.Linear's own init, as PEFT does; the data-dependent starts overwrite it (model.starts)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            self.init_magnitude()

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """DoRA's start: ``m = ‖W + s·BA‖_row``, on the weight as the layer computes with it (4-bit: dequantized)."""
        self.lora_magnitude_vector.copy_(self._dora_norm())

    @torch.no_grad()
    def _dora_norm(self) -> torch.Tensor:
        weight = dense_weight(self.base, torch.float32)  # (out, in)
        return (weight + lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)).norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_reference:
            return self._reference_forward(x)
        if self.use_dora and not (self.merged or self.disabled):
            return self._dora_forward(x)
        if self.fused and not (self.merged or self.disabled):
            p = _dropout_p(self)
            out = fused_lora_linear(x, self.lora_A.weight, self.lora_B.weight, self.base, self.scaling, p)
            return out if self.offset is None else out - self._offset_update(x).to(out.dtype)
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        x_lora = self.dropout(x).to(self.lora_A.weight.dtype)  # (..., in)
        update = self.lora_B(self.lora_A(x_lora))  # (..., r) -> (..., out)
        if self.offset is not None:  # on the input without dropout: s·B₀A₀ is part of the base's weight
            return out + (update * self.scaling - self._offset_update(x)).to(out.dtype)
        return out + (update * self.scaling).to(out.dtype)

    def _offset_update(self, x: torch.Tensor) -> torch.Tensor:
        """s·B₀A₀x in float32: what a PiSSA / OLoRA start takes off the base."""
        lora_A, lora_B = self.offset  # type: ignore[misc]
        return ((x.to(lora_A.dtype) @ lora_A.T) @ lora_B.T) * self.scaling

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + (m/n - 1) · W x + (m/n) · s · B A x`` with ``n = ‖W + s·BA‖_row`` held constant; under
        dropout ``W x`` is recomputed on the dropped-out input, as PEFT does."""
        out = self.base(x)
        scale = self.lora_magnitude_vector / self._dora_norm()  # (out,); gradient to the magnitude only
        x_lora = self.dropout(x)
        update = self.lora_B(self.lora_A(x_lora.to(self.lora_A.weight.dtype)))
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.bias
            base_out = (out - bias if bias is not None else out).float()
        else:
            weight = dense_weight(self.base, torch.float32).clone()  # kept for backward: not the shared buffer
            base_out = x_lora.float() @ weight.T
        return out + ((scale - 1) * base_out + scale * update * self.scaling).to(out.dtype)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.reference is None:
            return out
        lora_A, lora_B = self.reference
        update = (x.to(lora_A.dtype) @ lora_A.T) @ lora_B.T
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight, float32, in the base weight's layout (a PiSSA / OLoRA
        start's offset taken off)."""
        delta = lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling, self.fan_in_fan_out)
        if self.offset is not None:
            delta = delta - lora_delta(self.offset[0], self.offset[1], self.scaling, self.fan_in_fan_out)
        return delta

    def merge(self) -> None:
        """Add the delta into a 16/32-bit base weight in place (a 4-bit base goes through ``qlora merge``)."""
        if self.merged:
            return
        if is_quantized(self.base):
            raise ModelError("cannot merge into a 4-bit weight in place; use `qlora merge`, which dequantizes first")
        if self.use_dora:
            raise ModelError("merging a DoRA layer in place is not supported")
        w = self.base.weight
        w.data = (w.data.float() + self.delta_weight()).to(w.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        w.data = (w.data.float() - self.delta_weight()).to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, fan_in_fan_out={self.fan_in_fan_out}"


# ---------------------------------------------------------------------------------------------
# matching and injection


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def linear_module_names(model: nn.Module, include_head: bool = False) -> list[str]:
    """Names of every linear layer (``nn.Linear``, ``Linear4bit``, ``Conv1D``), the output head excluded."""
    head = None if include_head else output_head(model)
    inside_lora = {id(sub) for m in model.modules() if isinstance(m, LoRALinear) for sub in m.modules()}
    names = []
    for name, module in model.named_modules():
        if id(module) in inside_lora:
            continue
        if is_linear(module) and module is not head and name:
            names.append(name)
    return names


def matches_target(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def match_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The names of the modules LoRA will wrap. Raises ``ModelError`` for a target that matches nothing."""
    linear = linear_module_names(model)
    if targets == "all-linear":
        if not linear:
            raise ModelError("lora_target_modules: all-linear found no linear layers in this model")
        return linear
    all_linear = set(linear_module_names(model, include_head=True))
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in all_linear if matches_target(n, target)]
        if not hits:
            other = [n for n, _ in model.named_modules() if n and matches_target(n, target)]
            if other:
                kind = type(model.get_submodule(other[0])).__name__
                raise ModelError(
                    f"lora_target_modules: '{target}' matches '{other[0]}', a {kind}, not a linear layer; "
                    f"linear layers here: {', '.join(suffixes(linear))}"
                )
            raise ModelError(
                f"lora_target_modules: '{target}' matches no module; linear layers in this model: "
                f"{', '.join(suffixes(linear))} (or use all-linear)"
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, n in enumerate(n for n, _ in model.named_modules())}
    return sorted(chosen, key=order.__getitem__)


def suffixes(names: list[str]) -> list[str]:
    """Unique last name components in first-seen order: ['q_proj', 'k_proj', ...]."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n.rsplit(".", 1)[-1], None)
    return list(seen)


def inject_lora(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Freeze ``model`` and wrap each targeted linear layer in a ``LoRALinear``. Returns the wrapped names."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ModelError("this model already has LoRA layers")
    names = match_targets(model, settings.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child_name)
        layer = LoRALinear(
            base, settings.r, settings.alpha, settings.dropout, settings.use_rslora, settings.use_dora, settings.init
        )
        layer.train(base.training)  # a new module starts in training mode; follow the model's mode
        setattr(parent, child_name, layer)
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def set_fused(model: nn.Module, fused: bool, norms: bool = True) -> None:
    """Run every LoRA layer through the fused kernel (``kernels.lora_linear``) or the plain path: the config's
    ``fused_lora``, set the same way by training, evaluation and the memory plan. Fused, a SwiGLU MLP whose three
    projections are LoRA layers runs as one node (``kernels.swiglu``), and so does each RMSNorm that
    ``kernels.rms_norm`` computes to the bit (``is_rms_norm``), unless ``norms`` is False (``torch_compile``
    fuses norms itself)."""
    for _, layer in lora_layers(model):
        layer.fused = fused
    for module in model.modules():
        if fused and is_swiglu_mlp(module):
            module.forward = _fused_mlp_forward.__get__(module)  # an instance attribute: the class is untouched
            module._qlora_fused_mlp = True
        elif _installed(module, _fused_mlp_forward):
            del module.forward, module._qlora_fused_mlp
        if fused and norms and is_rms_norm(module):
            module.forward = _fused_norm_forward.__get__(module)
        elif _installed(module, _fused_norm_forward):
            del module.forward


def _installed(module: nn.Module, forward: object) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is forward


_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A transformers MLP computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU (Llama, Mistral,
    Qwen2/3, SmolLM3, Granite, OLMo-2, ...): exactly those children, no parameters of its own, LoRA layers."""
    children = dict(module.named_children())
    return (
        type(module).__name__.endswith("MLP")
        and type(module).__module__.startswith("transformers.models.")
        and set(children) == {*_MLP_PARTS, "act_fn"}
        and type(children["act_fn"]).__name__ in ("SiLU", "SiLUActivation")
        and all(isinstance(children[n], LoRALinear) for n in _MLP_PARTS)
        and not list(module.parameters(recurse=False))
    )


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward through ``fused_swiglu_mlp`` while its three LoRA layers take the plain fused path (not
    merged, disabled, a reference, DoRA or offset; one dropout); otherwise the class's own forward."""
    parts = [getattr(self, n) for n in _MLP_PARTS]
    rates = {_dropout_p(p) for p in parts}
    plain = any(
        not p.fused or p.merged or p.disabled or p.use_reference or p.use_dora or p.offset is not None for p in parts
    )
    if plain or len(rates) != 1 or not swiglu_supported(x, tuple(p.base for p in parts)):
        return type(self).forward(self, x)
    layers = tuple((p.lora_A.weight, p.lora_B.weight, p.base) for p in parts)
    return fused_swiglu_mlp(x, layers, tuple(p.scaling for p in parts), rates.pop())


_NORM_VARIANTS = (("llama", 0.0), ("gemma", 1.0), ("gemma", 0.0))  # Llama ..., Gemma 1-3, OLMo-2
_RMS_NORM_CLASSES: dict[type, tuple[str, float] | None] = {}  # class -> the fused variant equal to it, to the bit


def is_rms_norm(module: nn.Module) -> bool:
    """A transformers RMSNorm that ``fused_rms_norm`` computes: a ``weight`` vector, an ``eps``
    (``variance_epsilon``), no children, and a class whose own forward gives the same bits as one of the fused
    variants on a probe in float32 and bfloat16: Llama's ``weight * x̂.to(dtype)`` (Mistral, Qwen, Phi-3, SmolLM3,
    Granite, ...), Gemma's ``(x̂ * (1 + weight)).to(dtype)``, OLMo-2's ``(weight * x̂).to(dtype)``."""
    return _norm_variant(module) is not None


def _norm_variant(module: nn.Module) -> tuple[str, float] | None:
    weight = module._parameters.get("weight")
    cls = type(module)
    if (
        not cls.__name__.endswith("RMSNorm")
        or not cls.__module__.startswith("transformers.models.")
        or weight is None
        or weight.dim() != 1
        or _norm_eps(module) is None
        or list(module.children())
        or set(module._parameters) != {"weight"}
    ):
        return None
    if cls not in _RMS_NORM_CLASSES:
        _RMS_NORM_CLASSES[cls] = next((v for v in _NORM_VARIANTS if _probe_rms_norm(module, *v)), None)
    return _RMS_NORM_CLASSES[cls]


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _probe_rms_norm(module: nn.Module, style: str, offset: float) -> bool:
    """Does the class's forward equal this variant of ``fused_rms_norm`` on random rows and a random weight (a
    stand-in module sharing the instance's attributes: the model's own weight may be on the meta device)?"""
    g = torch.Generator().manual_seed(0)
    width = module._parameters["weight"].shape[0]
    stand_in = object.__new__(type(module))
    stand_in.__dict__.update(module.__dict__)
    eps = _norm_eps(module)
    for dtype in (torch.float32, torch.bfloat16):
        weight = (1 + torch.randn(width, generator=g)).to(dtype)
        stand_in.__dict__["_parameters"] = {"weight": nn.Parameter(weight, requires_grad=False)}
        x = (3 * torch.randn(4, width, generator=g)).to(dtype)
        try:
            with torch.no_grad():
                same = torch.equal(type(module).forward(stand_in, x), fused_rms_norm(x, weight, eps, style, offset))
        except Exception:  # noqa: BLE001 - a forward that takes other arguments is not this norm
            return False
        if not same:
            return False
    return True


def _fused_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    style, offset = _RMS_NORM_CLASSES[type(self)]
    return fused_rms_norm(x, self.weight, _norm_eps(self), style, offset)


def _dropout_p(layer: LoRALinear) -> float:
    return layer.dropout.p if isinstance(layer.dropout, LoRADropout) and layer.dropout.training else 0.0


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    out = []
    for _, m in lora_layers(model):
        out += [m.lora_A.weight, m.lora_B.weight] + ([m.lora_magnitude_vector] if m.use_dora else [])
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module path>.lora_A.weight": (r, in), "<module path>.lora_B.weight": (out, r)}``, detached.

    A layer with a PiSSA / OLoRA offset is written in PEFT's converted form (PEFT's
    ``path_initial_model_for_weight_conversion``): ``A' = [A; A₀]`` (2r, in), ``B' = [B, −B₀]`` (out, 2r), a plain
    LoRA of twice the rank and the same scaling on the unchanged base: ``s·B'A' = s·BA − s·B₀A₀``, exactly."""
    state = {}
    for name, m in lora_layers(model):
        lora_A, lora_B = m.lora_A.weight.detach(), m.lora_B.weight.detach()
        if m.offset is not None:
            lora_A, lora_B = torch.cat([lora_A, m.offset[0]], 0), torch.cat([lora_B, -m.offset[1]], 1)
        state[f"{name}.lora_A.weight"] = lora_A
        state[f"{name}.lora_B.weight"] = lora_B
        if m.use_dora:
            state[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    return state


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone: every LoRA layer returns ``base(x)`` inside this block."""
    from qlora_cli.model.token_rows import row_modules

    layers = [m for _, m in lora_layers(model)] + [m for _, m in row_modules(model)]  # trained token rows too
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was


def freeze_reference(model: nn.Module) -> None:
    """Keep a frozen copy of every LoRA layer's current weights as the reference ``lora_reference`` runs."""
    for _, m in lora_layers(model):
        m.reference = (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone())


@contextmanager
def lora_reference(model: nn.Module) -> Iterator[None]:
    """Run the reference model of preference tuning: each LoRA layer adds its frozen reference weights
    (``freeze_reference``), or nothing when it has none (the base alone)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.use_reference = True
    try:
        yield
    finally:
        for m in layers:
            m.use_reference = False
