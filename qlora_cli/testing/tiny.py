"""Tiny random-init models and a character-level tokenizer, built in code and saved as ordinary
transformers folders, for the demo and the tests (nothing is downloaded; the folders load exactly as a
downloaded model would).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from qlora_cli.data.chat_templates import CHATML_TEMPLATE as CHATML

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n\t"


def build_char_tokenizer(pad_is_eos: bool = False, add_bos: bool = True, chat_template: str | None = CHATML) -> Any:
    """A fast character-level tokenizer: one token per character, plus the special tokens above.

    ``pad_is_eos`` makes pad == eos (as in Llama and GPT-2 setups), to test that EOS stays a target.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIAL_TOKENS)
    return _fast_tokenizer(tk, add_bos, "</s>" if pad_is_eos else "<pad>", chat_template)


def _fast_tokenizer(tk: Any, add_bos: bool, pad_token: str, chat_template: str | None) -> Any:
    """``tk`` (a ``tokenizers.Tokenizer`` holding ``SPECIAL_TOKENS``) as a transformers tokenizer: <s> added
    in front of every text when ``add_bos``, ChatML's markers as special tokens, ``chat_template`` set."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if add_bos:
        bos = [("<s>", tk.get_vocab()["<s>"])]
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=pad_token,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


BPE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog did not move, and the fox ran into the forest. "
    "Question: What is the capital of France? Answer: The capital of France is Paris. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n"
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. "
    "Translate to German: The weather is nice today. German: Das Wetter ist heute schön. 1, 1, 2, 3, 5, 8, 13, 21."
)


def build_bpe_tokenizer(kind: str = "llama3", vocab_size: int = 400, chat_template: str | None = CHATML) -> Any:
    """A small trained BPE tokenizer of a real model family's kind, for the GGUF export tests:

    ``llama3``       byte-level BPE split by Llama 3's pattern, BOS added (Llama 3, SmolLM-style)
    ``qwen2``        byte-level BPE split by Qwen2's pattern, no BOS
    ``sentencepiece``  sentencepiece-style BPE ("▁" for spaces, byte fallback tokens <0x00>..<0xFF>), BOS
                     added, "▁" prefixed to the text (Llama 2, Mistral, Phi-3)
    ``gemma``        the same without the "▁" prefix (Gemma)
    Special tokens are ``SPECIAL_TOKENS`` (ChatML's turn markers among them)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from qlora_cli.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT

    corpus = [BPE_CORPUS] * 4
    if kind in ("llama3", "qwen2"):
        split = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(corpus, trainer)
    elif kind in ("sentencepiece", "gemma"):
        # train on "▁"-spelled text, then lay the vocabulary out as Llama 2's is: specials, 256 byte tokens, pieces
        sp = Tokenizer(models.BPE())
        sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        sp.pre_tokenizer = pre_tokenizers.Split(Regex("▁[^▁]*|[^▁]+"), behavior="isolated")
        sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
        pieces = sorted(sp.get_vocab().items(), key=lambda kv: kv[1])
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)])}
        for piece, _ in pieces:
            vocab.setdefault(piece, len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(sp)]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        replace = normalizers.Replace(" ", "▁")
        tk.normalizer = replace if kind == "gemma" else normalizers.Sequence([normalizers.Prepend("▁"), replace])
        tk.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        tk.add_special_tokens(SPECIAL_TOKENS)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return _fast_tokenizer(tk, kind != "qwen2", "<pad>", chat_template)


def _merges(tk: Any) -> list[Any]:
    import json

    return json.loads(tk.to_str())["model"]["merges"]


def _common(tok: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def tiny_config(
    arch: str,
    tok: Any,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 512,
    **extra: Any,
) -> Any:
    """A transformers config for ``arch`` at toy size. ``arch`` is a model_type: llama, qwen2, mistral,
    phi3, gemma2, gpt2, gpt_neox, opt. ``extra`` goes to every architecture's config (e.g. initializer_range,
    or the dropout keys: GPT-2's resid_pdrop/embd_pdrop/attn_pdrop, OPT's dropout)."""
    import transformers as tf

    inter = intermediate or 2 * hidden
    c = _common(tok)
    llama_like = dict(
        **extra,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        **c,
    )
    if arch == "llama":
        return tf.LlamaConfig(**llama_like, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like)
    if arch == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=hidden // heads)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **extra, **c)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            **extra,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=max_positions,
            **c,
        )
    if arch == "opt":
        return tf.OPTConfig(
            **extra,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=inter,
            max_position_embeddings=max_positions,
            word_embed_proj_dim=hidden,
            **c,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}")


def build_tiny_model(
    folder: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    **config_kwargs: Any,
) -> Path:
    """Save a random-init ``arch`` model and its tokenizer to ``folder`` (safetensors). Returns the folder."""
    from transformers import AutoModelForCausalLM

    from qlora_cli.model.loading import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    tok = tokenizer if tokenizer is not None else build_char_tokenizer()
    config = tiny_config(arch, tok, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_llama_8b_shapes(folder: str | Path) -> Path:
    """Llama-3.1-8B's config.json plus the character tokenizer, no weights: enough for ``qlora inspect``'s
    meta-device model and memory plan at a real size. Returns the folder."""
    from transformers import LlamaConfig

    folder = Path(folder)
    LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ).save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    return folder
