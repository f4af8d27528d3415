"""The resident parts of the plan, exact byte counts from the model's shapes on the meta device (4-bit weights
and their constants, 16-bit and float32 parts, adapter, optimizer state), and their measured counterparts."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qlora_cli.config import RunConfig
from qlora_cli.errors import ModelError
from qlora_cli.model.loading import DTYPES

# -- bitsandbytes storage layout ----------------------------------------------------------------------
NF4_BLOCKSIZE = 64  # values per absmax block (bitsandbytes' 4-bit default)
NESTED_BLOCKSIZE = 256  # absmax values per second-level block with double quantization
OPTIM_BLOCKSIZE = 256  # 8-bit optimizer state block size
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps float32 optimizer state for tensors with fewer elements

# ---------------------------------------------------------------------------------------------
# the model skeleton (meta device: shapes, no memory)


def load_model_config(cfg: RunConfig) -> Any:
    """The transformers config of ``cfg.base_model`` from local files only (a folder, a GGUF file, or the HF cache)."""
    from transformers import AutoConfig

    from qlora_cli.model.gguf import is_gguf, load_gguf_config
    from qlora_cli.model.loading import check_model_folder, is_local, quiet_libraries

    quiet_libraries()
    name = cfg.base_model
    if is_gguf(name):  # the config is in the file's metadata
        return load_gguf_config(name)
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
    from qlora_cli.model.lora import Conv1D, output_head

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
    from qlora_cli.model.lora import linear_shape

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
    """Exact bytes of the base as ``model.loading.load_base_model`` holds it, computed from the meta model's shapes."""
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


def extra_trained_shapes(model: nn.Module, cfg: RunConfig, targets: list[TargetInfo]) -> list[tuple[int, ...]]:
    """Shapes of what trains beside LoRA's A and B (float32, in the optimizer): DoRA's magnitude per target, whole
    copies of the embedding and head (``modules_to_save``; a tied pair shares one), or the rows of new tokens."""
    shapes: list[tuple[int, ...]] = [(t.out_features,) for t in targets] if cfg.use_dora else []
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and (
        head.weight is embed.weight or bool(getattr(model.config, "tie_word_embeddings", False))
    )
    width = embed.embedding_dim
    if cfg.modules_to_save:
        rows = embed.num_embeddings + len(cfg.added_tokens)
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is embed or m is head}
        listed = [n for n in cfg.modules_to_save if n in names]
        shapes += [(rows, width)] * (1 if tied else len(listed))
    elif cfg.trains_rows:
        rows = len(cfg.added_tokens) + len(cfg.trainable_token_indices)
        shapes += [(rows, width)] * (1 if tied or head is None else 2)
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


# ---------------------------------------------------------------------------------------------
# targets


def target_infos(model: nn.Module, cfg: RunConfig) -> list[TargetInfo]:
    """The modules LoRA will wrap, with their (in, out) features. Raises ``ModelError`` like ``inject_lora``."""
    from qlora_cli.model.lora import match_targets

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
