"""Base model and tokenizer loading: transformers + bitsandbytes NF4, on GPU or CPU.

The loading path is the same for a local folder and a hub id; tests and the demo load local folders built
in code, exactly as a downloaded model would be loaded. A ``.gguf`` file is first converted, once, into a
cached safetensors folder (``gguf.gguf_folder``); from then on it is loaded like any folder.
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
from qlora_cli.data.chat_templates import resolve_chat_template
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.layout import MANIFEST, MODEL_CONFIG, TOKENIZER_FILES
from qlora_cli.model.gguf import check_gguf, gguf_cache_folder, is_gguf, resolve_gguf

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # config names


def autocast(dtype: torch.dtype | str, device: torch.device | str) -> AbstractContextManager:
    """The autocast training runs its forward under: to the compute dtype (a torch dtype or its config name)
    on ``device``'s type, or nothing in float32. Norms, softmax and the loss stay float32 inside."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype a model's matmuls run in: its 4-bit layers' compute dtype, else the dtype it was loaded in
    (``load_base_model`` loads in the run's compute dtype; norms are upcast afterwards). float32 if unknown."""
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    dtype = (
        quant.get("bnb_4bit_compute_dtype")
        if isinstance(quant, dict)
        else getattr(quant, "bnb_4bit_compute_dtype", None)
    )
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def model_autocast(model: Any) -> AbstractContextManager:
    """``autocast`` for a model as training ran it: to its ``compute_dtype`` on its device. Scoring, generation
    and checks that are not handed the run's precision use this, never a bare forward."""
    return autocast(compute_dtype(model), module_device(model))


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
    if is_gguf(name) and what == "base_model":
        check_gguf(name)
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"{what} folder not found: {name}")
    if not path.is_dir():
        raise ModelError(f"{what} must be a model folder, got a file: {name}")
    if what == "tokenizer":
        if not any((path / f).exists() for f in TOKENIZER_FILES):
            raise ModelError(f"tokenizer folder {name} has no tokenizer files (tokenizer.json, tokenizer_config.json)")
    elif not (path / MODEL_CONFIG).exists():
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
    if is_gguf(cfg.base_model):
        path = Path(cfg.base_model).expanduser()
        folder = gguf_cache_folder(str(path), cfg.quant.compute_dtype) if path.is_file() else None
        if folder is not None and (folder / MANIFEST).exists():
            return  # converted before: it passed these checks then (parsing a large header again takes seconds);
            # gguf_folder checks the conversion itself when it is used
        check_gguf(cfg.base_model, need_tokenizer=cfg.tokenizer is None)
        return
    check_model_folder(cfg.base_model)
    check_weights(cfg.base_model, cfg.allow_pickle_weights)


def load_tokenizer(cfg: RunConfig | ModelSettings) -> Any:
    """The tokenizer with a pad token (EOS when it has none) and the configured chat template."""
    from transformers import AutoTokenizer

    cfg = resolve_gguf(_settings(cfg))
    name = cfg.tokenizer or cfg.base_model
    check_model_folder(name, "tokenizer" if cfg.tokenizer else "base_model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer from {name}: {str(e).splitlines()[0]}") from None
    add_tokens(tokenizer, cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels come from lengths, so EOS stays a target
    template = resolve_chat_template(cfg.chat_template)  # a family name becomes its template
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.padding_side = "right"
    return tokenizer


def add_tokens(tokenizer: Any, cfg: ModelSettings) -> None:
    """The config's ``special_tokens`` (with their roles, when given as a dict) and ``tokens``, added to the
    tokenizer; a token it already has keeps its id. ``tokenizer.qlora_new_tokens`` lists those it did not have."""
    vocab = tokenizer.get_vocab() if cfg.special_tokens or cfg.tokens else {}
    for item in cfg.special_tokens:
        if isinstance(item, tuple):
            role, token = item
            tokenizer.add_special_tokens({role: token})
        else:
            tokenizer.add_tokens([item], special_tokens=True)
    if cfg.tokens:
        tokenizer.add_tokens(list(cfg.tokens))
    named = [t[1] if isinstance(t, tuple) else t for t in cfg.special_tokens] + list(cfg.tokens)
    tokenizer.qlora_new_tokens = [t for t in dict.fromkeys(named) if t not in vocab]


def bnb_config(quant: QuantSettings) -> Any:
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("load_in_4bit: true needs bitsandbytes; pip install 'bitsandbytes>=0.50'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=getattr(torch, getattr(quant, "quant_storage", "uint8")),
    )


# For every from_pretrained: transformers (5.x, with the `kernels` package installed) otherwise swaps hub kernels
# into the norms and rotary at load and again at every train()/eval(), undoing qlora's fused norms and Liger's, and
# on a GPU fetches them from the Hub.
NO_HUB_KERNELS = {"use_kernels": False}


def load_base_model(cfg: RunConfig | ModelSettings, device: torch.device, keep_16bit: list[str] | None = None) -> Any:
    """The frozen base model on ``device``, 4-bit when asked, norms and biases in float32 under autocast.

    ``keep_16bit``: module names (patterns) left unquantized, in the compute dtype; it replaces transformers'
    default skip list, which holds the output head, so include the head. Returns a transformers ``PreTrainedModel`` with ``use_cache`` off (training) and no
    parameter requiring grad.
    """
    from transformers import AutoModelForCausalLM

    quiet_libraries()  # before bitsandbytes is imported: it logs optional-kernel notices at import
    cfg = resolve_gguf(_settings(cfg))
    check_base_model(cfg)
    quant = cfg.quant
    dtype = DTYPES[quant.compute_dtype]
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": {"": device},
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": not cfg.allow_pickle_weights,
        **NO_HUB_KERNELS,
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
    and autocast runs norms in float32 anyway. Embeddings and the output head stay 16-bit (they are large).

    A float32 norm weight makes the norm's output float32, and from there the projections (which return their
    input's dtype) and the residual stream would stay float32 for the rest of the model: twice the activation
    memory, and twice the bytes gradient checkpointing saves or offloads. So under 16-bit autocast each norm
    hands on its output in the autocast dtype (``norms_output_compute_dtype``), which is what the next matmul
    reads anyway; the norm's own math stays float32."""
    for p in model.parameters():
        if p.ndim == 1 and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    norms_output_compute_dtype(model)


def norms_output_compute_dtype(model: torch.nn.Module) -> None:
    """Under 16-bit autocast, every norm module (class name ending in ``Norm``: RMSNorm, LayerNorm) returns its
    output in the autocast dtype instead of float32; outside autocast it is left as it is. Idempotent."""
    for module in model.modules():
        if type(module).__name__.endswith("Norm") and not getattr(module, "_qlora_compute_dtype_output", False):
            module.register_forward_hook(_output_in_autocast_dtype)
            module._qlora_compute_dtype_output = True


def _output_in_autocast_dtype(module: torch.nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.dtype == torch.float32:
        device_type = output.device.type
        if torch.is_autocast_enabled(device_type):
            return output.to(torch.get_autocast_dtype(device_type))
    return None


def enable_gradient_checkpointing(model: Any, offload: bool = False, every_n_layers: int = 1) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing needs no input that requires grad,
    which is what makes it work with a frozen (4-bit) base and trainable adapters inside it.

    ``offload`` keeps the saved layer inputs in pinned CPU memory; ``every_n_layers`` > 1 recomputes only
    every n-th decoder layer. transformers has three shapes of this API within the versions qlora supports,
    told apart by what the methods take, never by version number:
      ``activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)`` (5.23+),
      ``gradient_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)`` (5.17-5.22),
      ``gradient_checkpointing_enable(gradient_checkpointing_kwargs[, every_n_layers])`` (5.0-5.16; 5.16 takes
      ``every_n_layers`` but not ``offload``): there qlora applies both options itself (``_checkpoint_options``),
      as the later releases do."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    if offload and module_device(model).type == "cpu":
        offload = False  # the activations already live in host memory; there is nothing to move
    kwargs = {"use_reentrant": False}
    options = {"every_n_layers": every_n_layers, "offload": offload} if offload or every_n_layers > 1 else {}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable) and _takes(enable, "activation_checkpointing_kwargs", *options):
        enable(activation_checkpointing_kwargs=kwargs, **options)
        return
    enable = model.gradient_checkpointing_enable
    if _takes(enable, "gradient_checkpointing_kwargs", *options):
        enable(gradient_checkpointing_kwargs=kwargs, **options)
        return
    enable(gradient_checkpointing_kwargs=kwargs)  # every layer, on the device
    if options:
        _checkpoint_options(model, offload, every_n_layers)


def _takes(fn: Any, *names: str) -> bool:
    """Whether ``fn`` accepts each keyword in ``names`` by name (a ``**kwargs`` catch-all does not count:
    transformers' deprecated aliases forward anything and fail later)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params and params[n].kind != inspect.Parameter.VAR_KEYWORD for n in names)


def _checkpoint_options(model: Any, offload: bool, every_n_layers: int) -> None:
    """``offload`` and ``every_n_layers`` on a model whose transformers checkpointed every layer without them:
    what transformers 5.17+ does inside ``_set_gradient_checkpointing``. Each decoder layer
    (``GradientCheckpointingLayer``) recomputes only when its index is a multiple of ``every_n_layers``, and
    with ``offload`` the inputs a checkpoint saves go to pinned host memory while it runs."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(
            f"gradient_checkpointing: offload/checkpoint_every_n_layers: {type(model).__name__} has no "
            "checkpointed decoder layers this transformers can configure; set them to their defaults"
        )
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every_n_layers == 0
        if offload:
            layer._gradient_checkpointing_func = _offloaded(layer._gradient_checkpointing_func)


def _offloaded(checkpoint_fn: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return checkpoint_fn(*args, **kwargs)

    return run


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
