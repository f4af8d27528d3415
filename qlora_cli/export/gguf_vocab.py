"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``), the way llama.cpp reads it.

Two kinds of tokenizer are written, from the tokenizer's own ``tokenizer.json``:

    byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM)   tokenizer.ggml.model = gpt2, tokens as the vocab spells
                                                     them, merges, and ``pre`` naming llama.cpp's pre-tokenizer
    sentencepiece BPE (Llama 2, Mistral, Gemma, Phi-3)  tokenizer.ggml.model = llama, tokens with scores that
                                                     rank each token by the merge that forms it, byte tokens

A base that was itself a GGUF file keeps that file's tokenizer metadata as it was (only the chat template
is the run's). Anything else (WordLevel, Unigram, a byte-level pre-tokenizer llama.cpp has no name for) is
refused: a file whose tokenizer splits text differently from training would load and answer badly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_cli.errors import ModelError
from qlora_cli.model.gguf import field_value

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns and the name llama.cpp knows each by (tokenizer.ggml.pre)
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

# end-of-turn tokens llama.cpp and Ollama stop on
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def vocab_metadata(
    tokenizer: Any, vocab_size: int, source_gguf: str | None = None, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """{GGUF key: value} for the tokenizer: tokens, types, merges or scores, special ids, flags and the
    chat template. ``vocab_size``: the model's embedding rows (unused rows are padded as UNUSED tokens).
    Raises ``ModelError`` for a tokenizer llama.cpp cannot reproduce."""
    md = _from_gguf(source_gguf) if source_gguf is not None else {}
    if "tokenizer.ggml.tokens" not in md:  # no GGUF base, or one without a tokenizer (the run named its own)
        md = _from_tokenizer_json(tokenizer, vocab_size)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        md["tokenizer.chat_template"] = template
    else:
        md.pop("tokenizer.chat_template", None)
    for key in ("bos", "eos"):  # a tokenizer without one (Qwen2 has no BOS token): the model config's id, as
        # llama.cpp's converter writes it (else llama.cpp falls back to a default id of its own)
        value = (config or {}).get(f"{key}_token_id")
        if f"tokenizer.ggml.{key}_token_id" not in md and isinstance(value, int):
            md[f"tokenizer.ggml.{key}_token_id"] = value
    tokens = md["tokenizer.ggml.tokens"]
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:  # llama.cpp asserts on such a vocabulary at load (Ollama and LM Studio use its loader)
            raise ModelError(
                f"GGUF export: the tokenizer holds {token!r} twice (ids {seen[token]} and {i}); llama.cpp refuses a "
                "vocabulary with duplicate tokens"
            )
        seen[token] = i
    if len(tokens) != vocab_size:
        raise ModelError(
            f"GGUF export: the tokenizer has {len(tokens)} tokens but the model's embedding has {vocab_size} rows"
        )
    return md


def _from_gguf(path: str) -> dict[str, Any]:
    """The ``tokenizer.*`` fields of a GGUF file, as they are."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    md: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            md[key] = field_value(field)
    return md


def _from_tokenizer_json(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("GGUF export needs a fast tokenizer (tokenizer.json); this tokenizer has none")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise ModelError(
            f"GGUF export: the tokenizer is a {kind} model; llama.cpp reads byte-level or sentencepiece BPE tokenizers"
        )
    byte_level = _has(spec.get("pre_tokenizer"), "ByteLevel") or _has(spec.get("decoder"), "ByteLevel")
    if not byte_level and not model.get("byte_fallback"):
        raise ModelError(
            "GGUF export: the tokenizer is BPE without byte-level encoding or byte fallback; "
            "llama.cpp could not encode every text the way it does"
        )
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has {n} tokens, more than the model's {vocab_size} rows")
    tokens: list[str | None] = [None] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
    types = [NORMAL] * vocab_size
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    added = {a["content"]: bool(a.get("special")) for a in spec.get("added_tokens") or []}
    unk = tokenizer.unk_token
    for i, t in enumerate(tokens):
        if t in added:
            types[i] = CONTROL if added[t] else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    md: dict[str, Any] = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges}
    if byte_level:
        md["tokenizer.ggml.model"] = "gpt2"
        md["tokenizer.ggml.pre"] = _pre_name(spec.get("pre_tokenizer"))
    else:
        md["tokenizer.ggml.model"] = "llama"
        md["tokenizer.ggml.pre"] = "default"
        for i, t in enumerate(tokens):
            if types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = BYTE
            elif t == unk:
                types[i] = UNKNOWN
        md["tokenizer.ggml.scores"] = _merge_scores(tokens, merges)
        md["tokenizer.ggml.add_space_prefix"] = _adds_space_prefix(spec)
    md["tokenizer.ggml.token_type"] = types
    specials = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unknown": tokenizer.unk_token_id,
        "padding": tokenizer.pad_token_id,
    }
    for key, value in specials.items():
        if value is not None:
            md[f"tokenizer.ggml.{key}_token_id"] = int(value)
    eot = next((vocab[t] for t in END_OF_TURN if t in vocab and added.get(t)), None)
    if eot is not None:
        md["tokenizer.ggml.eot_token_id"] = int(eot)
    ids = tokenizer("a")["input_ids"]
    md["tokenizer.ggml.add_bos_token"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    md["tokenizer.ggml.add_eos_token"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    return md


def _has(node: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) contains one of type ``kind``."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_has(n, kind) for key in ("pretokenizers", "decoders", "normalizers") for n in node.get(key) or [])


def _parts(node: Any) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [p for n in node.get("pretokenizers") or [] for p in _parts(n)]
    return [node]


def _pre_name(pre: Any) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer. Raises ``ModelError`` for one it lacks."""
    parts = _parts(pre)
    splits = [
        p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and isinstance(p.get("pattern"), dict)
    ]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(splits) == 1 and splits[0] in KNOWN_SPLITS:
        return KNOWN_SPLITS[splits[0]]
    if not splits and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        digits = [p for p in parts if p.get("type") == "Digits"]
        if not digits and len(parts) == 1:
            return "gpt-2"
        if len(digits) == 1 and digits[0].get("individual_digits") and len(parts) == 2:
            return "smollm"
    raise ModelError(
        "GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp knows by name (GPT-2, Llama 3, Qwen2 "
        "and SmolLM are); llama.cpp would split text differently from training"
    )


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Sentencepiece scores from BPE merges: a token formed by merge number k scores -k, so llama.cpp's
    highest-score-first merging applies the merges in their order; tokens no merge forms score lower
    than any merge (a pair that happens to spell one is merged last)."""
    rank = {}
    for k, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, k)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else floor) for t in tokens]


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the sentencepiece tokenizer prepends "▁" to the text (Llama 2, Mistral: yes; Gemma: no)."""
    normalizer = json.dumps(spec.get("normalizer"))
    pre = spec.get("pre_tokenizer") or {}
    if '"Prepend"' in normalizer:
        return True
    for part in _parts(pre):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
    return False


def source_gguf_file(base_model: str) -> str | None:
    """The base's GGUF file when the run trained on one (its tokenizer metadata is copied as it is)."""
    return base_model if base_model.lower().endswith(".gguf") and Path(base_model).expanduser().is_file() else None
