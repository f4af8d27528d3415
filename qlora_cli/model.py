"""Base model and tokenizer loading: transformers + bitsandbytes NF4, on GPU or CPU.

The loading path is the same for a local folder and a hub id; tests and the demo load local folders built
in code, exactly as a downloaded model would be loaded.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from qlora_cli.config import ModelSettings, QuantSettings, RunConfig
from qlora_cli.data import CHATML_TEMPLATE
from qlora_cli.errors import ConfigError, ModelError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # config names


def autocast(dtype: torch.dtype | str, device: torch.device | str) -> AbstractContextManager:
    """The autocast training runs its forward under: to the compute dtype (a torch dtype or its config name)
    on ``device``'s type, or nothing in float32. Norms, softmax and the loss stay float32 inside."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's (first) parameter lives; the CPU for a module without parameters."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def quiet_libraries() -> None:
    """Silence load-time chatter (progress bars, optional-kernel notices) that is not the user's concern."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA GPU is available (use device: auto or cpu)")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def is_local(name: str) -> bool:
    """A path-like name (or an existing folder) is local; ``org/model`` that does not exist is a hub id."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


def check_model_folder(name: str, what: str = "base_model") -> None:
    """Fail early, in one line, on a local model folder that cannot be loaded."""
    if not is_local(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"{what} folder not found: {name}")
    if not path.is_dir():
        raise ModelError(f"{what} must be a model folder, got a file: {name}")
    if what == "tokenizer":
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ModelError(f"tokenizer folder {name} has no tokenizer files (tokenizer.json, tokenizer_config.json)")
    elif not (path / "config.json").exists():
        raise ModelError(f"{what} folder {name} has no config.json (is it a transformers model folder?)")


def check_weights(name: str, allow_pickle: bool) -> None:
    if not is_local(name):
        return
    path = Path(name).expanduser()
    safetensors = list(path.glob("*.safetensors"))
    pickles = list(path.glob("*.bin")) + list(path.glob("*.pt"))
    if safetensors:
        return
    if pickles and not allow_pickle:
        raise ModelError(
            f"base_model folder {name} has only pickle weights ({pickles[0].name}); qlora reads safetensors only "
            "unless you set allow_pickle_weights: true (pickle files can run code when loaded)"
        )
    if not pickles:
        raise ModelError(f"base_model folder {name} has no weights (*.safetensors)")


def _settings(cfg: RunConfig | ModelSettings) -> ModelSettings:
    return cfg.base if isinstance(cfg, RunConfig) else cfg


def check_base_model(cfg: RunConfig | ModelSettings) -> None:
    cfg = _settings(cfg)
    check_model_folder(cfg.base_model)
    check_weights(cfg.base_model, cfg.allow_pickle_weights)


def load_tokenizer(cfg: RunConfig | ModelSettings) -> Any:
    """The tokenizer with a pad token (EOS when it has none) and the configured chat template."""
    from transformers import AutoTokenizer

    cfg = _settings(cfg)
    name = cfg.tokenizer or cfg.base_model
    check_model_folder(name, "tokenizer" if cfg.tokenizer else "base_model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer from {name}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels come from lengths, so EOS stays a target
    if cfg.chat_template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    tokenizer.padding_side = "right"
    return tokenizer


def bnb_config(quant: QuantSettings) -> Any:
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("load_in_4bit: true needs bitsandbytes; pip install 'bitsandbytes>=0.49'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=getattr(torch, getattr(quant, "quant_storage", "uint8")),
    )


def load_base_model(cfg: RunConfig | ModelSettings, device: torch.device, keep_16bit: list[str] | None = None) -> Any:
    """The frozen base model on ``device``, 4-bit when asked, norms and biases in float32 under autocast.

    ``keep_16bit``: module names (patterns) left unquantized, in the compute dtype; it replaces transformers'
    default skip list, which holds the output head, so include the head. Returns a transformers ``PreTrainedModel`` with ``use_cache`` off (training) and no
    parameter requiring grad.
    """
    from transformers import AutoModelForCausalLM

    cfg = _settings(cfg)
    quiet_libraries()  # before bitsandbytes is imported: it logs optional-kernel notices at import
    check_base_model(cfg)
    quant = cfg.quant
    dtype = DTYPES[quant.compute_dtype]
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": {"": device},
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": not cfg.allow_pickle_weights,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quant)
        if keep_16bit is not None:
            kwargs["quantization_config"].llm_int8_skip_modules = keep_16bit
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load base model {cfg.base_model}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cpu":
        disable_cpu_weight_repacking(model)
    if dtype != torch.float32:
        upcast_small_parameters(model)
    return model


def disable_cpu_weight_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight the first time it runs in
    eval mode without grad, and from then on uses a kernel that has no autograd: after one evaluation,
    training would silently stop propagating gradients through the base layers. That kernel also computes
    in bfloat16 whatever the compute dtype. Turning it off keeps evaluation numerically equal to training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def upcast_small_parameters(model: torch.nn.Module) -> None:
    """Norm weights and biases to float32 (as PEFT's prepare_model_for_kbit_training does): they are tiny,
    and autocast runs norms in float32 anyway. Embeddings and the output head stay 16-bit (they are large)."""
    for p in model.parameters():
        if p.ndim == 1 and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def enable_gradient_checkpointing(model: Any, offload: bool = False, every_n_layers: int = 1) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing needs no input that requires grad,
    which is what makes it work with a frozen (4-bit) base and trainable adapters inside it.

    ``offload`` keeps the saved layer inputs in pinned CPU memory; ``every_n_layers`` > 1 recomputes only
    some layers (both need a transformers release with ``activation_checkpointing_enable``)."""
    import inspect

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers before the rename
        if offload or every_n_layers > 1:
            raise ConfigError(
                "gradient_checkpointing: offload and checkpoint_every_n_layers need a newer transformers "
                "(activation_checkpointing_enable)"
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    if offload and next(model.parameters()).device.type == "cpu":
        offload = False  # the activations already live in host memory; there is nothing to move
    options = inspect.signature(enable).parameters
    extra = {}
    if offload or every_n_layers > 1:
        if "offload" not in options or "every_n_layers" not in options:
            raise ConfigError("gradient_checkpointing: offload/checkpoint_every_n_layers need a newer transformers")
        extra = {"offload": offload, "every_n_layers": every_n_layers}
    enable(activation_checkpointing_kwargs=kwargs, **extra)


# ---------------------------------------------------------------------------------------------
# generation limits: when to stop, how long a sequence may be


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions allow (from its (text) config), or None when it does not say."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """The tokenizer's EOS, then the model's own end tokens (its generation config), each once."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(configured) if isinstance(configured, list | tuple) else [configured]
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token a chat template puts right after an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ...),
    or None (no template, or one that ends turns with plain text or EOS)."""
    marker = "qlora-end-of-turn-probe"
    try:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - no template, or one that rejects this conversation
        return None
    after = text[text.find(marker) + len(marker) :] if marker in text else ""
    ids = list(tokenizer(after, add_special_tokens=False)["input_ids"]) if after.strip() else []
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(model: Any, tokenizer: Any, chat: bool) -> list[int]:
    """EOS, the model's own end tokens and, for chat, the token that closes an assistant turn; each once."""
    ids = eos_token_ids(tokenizer, model)
    turn = end_of_turn_id(tokenizer) if chat else None
    return ids + [turn] if turn is not None and turn not in ids else ids
