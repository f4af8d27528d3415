"""What llama.cpp expects of each supported architecture: its GGUF architecture name, the metadata it reads,
tensor names (from the ``gguf`` package's own name map) and the layout changes its converter makes.

    family     HF model_type   GGUF arch   tensors changed on the way
    llama      llama           llama       attn_q / attn_k rows permuted (rotary pairs interleaved)
    mistral    mistral         llama       the same (llama.cpp runs Mistral as llama)
    qwen2      qwen2           qwen2       none (q/k/v biases kept, in f32)
    gemma2     gemma2          gemma2      every RMSNorm weight + 1 (Gemma's norms scale by 1 + w)
    phi3       phi3            phi3        none (qkv_proj and gate_up_proj stay fused)

Anything else is refused before a byte is written: a file that loads but computes something else is the
failure users report most about GGUF exports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlora_cli.errors import ModelError

# HF model_type -> GGUF architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "phi3": "phi3"}
SUPPORTED = ", ".join(ARCHITECTURES)

# --quant -> (GGML type of 2-D weights, llama.cpp's general.file_type)
QUANTS = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2),
    "q4_1": ("Q4_1", 3),
    "q5_0": ("Q5_0", 8),
    "q5_1": ("Q5_1", 9),
    "q6_k": ("Q6_K", 18),
    "q4_k_m": ("Q4_K", 15),  # Q4_K, with Q6_K for the output head and some layers' attn_v and ffn_down
}
DEFAULT_QUANT = "q8_0"


@dataclass(frozen=True)
class ArchSpec:
    """One model's GGUF layout: ``arch`` (llama.cpp's name) and the numbers its converter needs."""

    model_type: str
    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool


def config_value(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters in one dict (transformers 5 writes ``rope_parameters``, 4.x ``rope_scaling`` and
    ``rope_theta``): rope_type ("default" when none) and rope_theta among them."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def arch_spec(config: dict[str, Any]) -> ArchSpec:
    """The spec of a base model's config.json. Raises ``ModelError`` for what llama.cpp would run wrong."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export supports the {SUPPORTED} architectures; this base model is {model_type or 'unknown'!r}"
        )
    heads = int(config["num_attention_heads"])
    head_dim = int(config_value(config, "head_dim", default=config["hidden_size"] // heads))
    rope = rope_settings(config)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise ModelError(
            f"GGUF export: rope type {rope['rope_type']!r} is not supported (default, linear and llama3 are)"
        )
    if model_type == "phi3" and config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError("GGUF export: phi3 with a partial rotary factor is not supported")
    if model_type == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if key in config and config[key] is None:
                # llama.cpp always caps Gemma 2's logits (50 and 30 when the file does not say)
                raise ModelError(f"GGUF export: gemma2 without {key} would be capped in llama.cpp")
        scalar = config.get("query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            # llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B model)
            raise ModelError(
                f"GGUF export: gemma2 with query_pre_attn_scalar {scalar} != head_dim {head_dim} would run wrong in "
                "llama.cpp"
            )
    return ArchSpec(
        model_type=model_type,
        arch=ARCHITECTURES[model_type],
        n_layers=int(config["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(config_value(config, "num_key_value_heads", default=heads)),
        head_dim=head_dim,
        tied=bool(config.get("tie_word_embeddings", model_type == "gemma2")),
    )


def metadata(spec: ArchSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The ``{arch}.*`` keys llama.cpp reads, as {key: value} (ints are written as uint32, floats as float32)."""
    a = spec.arch
    hidden = int(config["hidden_size"])
    md: dict[str, Any] = {
        f"{a}.context_length": int(config_value(config, "max_position_embeddings", default=4096)),
        f"{a}.embedding_length": hidden,
        f"{a}.block_count": spec.n_layers,
        f"{a}.feed_forward_length": int(config["intermediate_size"]),
        f"{a}.attention.head_count": spec.n_heads,
        f"{a}.attention.head_count_kv": spec.n_kv_heads,
        f"{a}.attention.layer_norm_rms_epsilon": float(config_value(config, "rms_norm_eps", default=1e-6)),
        f"{a}.rope.freq_base": float(rope_settings(config)["rope_theta"]),
        f"{a}.rope.dimension_count": spec.head_dim,
        f"{a}.vocab_size": int(config["vocab_size"]),
    }
    if spec.head_dim != hidden // spec.n_heads or spec.model_type == "gemma2":
        md[f"{a}.attention.key_length"] = spec.head_dim
        md[f"{a}.attention.value_length"] = spec.head_dim
    rope = rope_settings(config)
    if rope["rope_type"] == "linear":
        md[f"{a}.rope.scaling.type"] = "linear"
        md[f"{a}.rope.scaling.factor"] = float(rope["factor"])
    if spec.model_type == "gemma2":
        md[f"{a}.attn_logit_softcapping"] = float(config_value(config, "attn_logit_softcapping", default=50.0))
        md[f"{a}.final_logit_softcapping"] = float(config_value(config, "final_logit_softcapping", default=30.0))
        md[f"{a}.attention.sliding_window"] = int(config_value(config, "sliding_window", default=4096))
    if spec.model_type == "phi3" and config.get("sliding_window") is not None:
        md[f"{a}.attention.sliding_window"] = int(config["sliding_window"])
    return md


def llama3_rope_factors(config: dict[str, Any], head_dim: int) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3.1's rope scaling: per frequency, the factor the base
    frequency is divided by (1 for short wavelengths, ``factor`` for long ones, smoothly between)."""
    rope = rope_settings(config)
    if rope["rope_type"] != "llama3":
        return None
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


class TensorNames:
    """HF tensor names -> GGUF names through the ``gguf`` package's map for the architecture."""

    def __init__(self, spec: ArchSpec):
        import gguf

        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.arch)
        self.map = gguf.get_tensor_name_map(arch, spec.n_layers)
        self.spec = spec

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for a tensor llama.cpp does not keep (a tied output head, rotary buffers).
        Raises ``ModelError`` for a weight it has no place for."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if self.spec.tied and hf_name in ("lm_head.weight", "output.weight"):
            return None
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no llama.cpp tensor for {hf_name} in a {self.spec.arch} model")
        return name


def changes_layout(spec: ArchSpec, gguf_name: str) -> bool:
    """Whether llama.cpp stores this tensor otherwise than transformers does (see ``to_gguf_layout``)."""
    rotary = spec.arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name)
    return rotary or (spec.model_type == "gemma2" and gguf_name.endswith("norm.weight"))


def to_gguf_layout(spec: ArchSpec, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """``w`` (float32, HF layout) as llama.cpp's converter stores it."""
    if not changes_layout(spec, gguf_name):
        return w
    if spec.model_type == "gemma2":
        return w + 1.0  # Gemma's RMSNorm scales by (1 + weight); llama.cpp's by the stored weight
    return permute_rotary(w, spec.n_heads if ".attn_q." in gguf_name else spec.n_kv_heads)


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from HF's rotate-half layout (first half, second half) to llama.cpp's
    interleaved pairs. Works on a weight (rows = outputs) and on a LoRA B matrix alike."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(quant: str, gguf_name: str, shape: tuple[int, ...], n_layers: int = 0) -> str:
    """The GGML type of one tensor: 1-D tensors (norms, biases) stay f32 as llama.cpp keeps them. With 4/5-bit
    block types the embeddings and the output head are kept at q8_0; ``q4_k_m`` follows llama-quantize's
    Q4_K_M recipe (Q6_K for the output head, for fused qkv, and for attn_v and ffn_down in the first and last
    eighth of the layers and every third layer between). A row length the blocks (32 values, 256 for
    K-quants) do not divide falls back to q8_0, or f16."""
    kind = QUANTS[quant][0]
    if len(shape) == 1 or kind == "F32":
        return "F32"
    if kind in ("F16", "BF16"):
        return kind
    role = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    if quant == "q4_k_m":
        layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
        if role in ("output", "attn_qkv") or (role in ("attn_v", "ffn_down") and _more_bits(layer, n_layers)):
            kind = "Q6_K"
    elif kind not in ("Q8_0", "Q6_K") and role in ("token_embd", "output"):
        kind = "Q8_0"
    if kind in ("Q4_K", "Q6_K") and shape[-1] % 256:
        kind = "Q8_0"
    return kind if shape[-1] % 32 == 0 else "F16"


def _more_bits(layer: int, n_layers: int) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
