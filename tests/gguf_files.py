"""Small GGUF files written in code with the gguf package (tiny random Llama models, broken variants)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one token per byte, as a byte-level BPE vocabulary starts."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # the 68 unprintable bytes map to 256, 257, ...
    return [chr(c) for c in cs]


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    tokenizer: bool = True,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    **broken: Any,
) -> Path:
    """A random-init Llama-shaped GGUF (F32 tensors) with a byte-level BPE tokenizer and a ChatML template.
    ``broken`` spoils it: ``rows`` (of the embedding), ``tokens``, ``merges``, ``bos``, ``tokenizer_model``, ``description`` replace those
    fields; ``extra_tensor=(name, array, raw_dtype)`` adds one tensor (raw_dtype: a GGMLQuantizationType name or None)."""
    import gguf

    heads, kv_heads, ff = 4, 2, 128
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    if "description" in broken:
        w.add_description(broken["description"])
    tokens = [*byte_level_tokens(), "he", "<|im_start|>", "<|im_end|>"]
    vocab = broken.get("rows", len(tokens))  # the embedding's rows
    w.add_vocab_size(vocab)
    if tokenizer:
        tokens = broken.get("tokens", tokens)
        w.add_tokenizer_model(broken.get("tokenizer_model", "gpt2"))
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
        if broken.get("merges", ["h e"]):
            w.add_token_merges(broken.get("merges", ["h e"]))
        w.add_bos_token_id(broken.get("bos", vocab - 2))
        w.add_eos_token_id(vocab - 1)
        w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def normal(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    head_dim = hidden // heads
    normal("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        normal(f"blk.{i}.attn_q.weight", hidden, hidden)
        normal(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        normal(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        normal(f"blk.{i}.attn_output.weight", hidden, hidden)
        normal(f"blk.{i}.ffn_gate.weight", ff, hidden)
        normal(f"blk.{i}.ffn_up.weight", ff, hidden)
        normal(f"blk.{i}.ffn_down.weight", hidden, ff)
    if "extra_tensor" in broken:
        name, array, raw_dtype = broken["extra_tensor"]
        w.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType[raw_dtype] if raw_dtype else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
