"""Base model and tokenizer loading: transformers + bitsandbytes NF4, on GPU or CPU.

The loading path is the same for a local folder and a hub id; tests and the demo load local folders built
in code, exactly as a downloaded model would be loaded. A ``.gguf`` file is first converted, once, into a
cached safetensors folder (``gguf_folder``); from then on it is loaded like any folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qlora_cli.chat_templates import resolve_chat_template
from qlora_cli.config import ModelSettings, QuantSettings, RunConfig
from qlora_cli.errors import ConfigError, ModelError

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
    if is_gguf(cfg.base_model):
        path = Path(cfg.base_model).expanduser()
        if path.is_file() and (gguf_cache_folder(str(path), cfg.quant.compute_dtype) / "config.json").exists():
            return  # converted before: it passed these checks then (parsing a large header again takes seconds)
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
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels come from lengths, so EOS stays a target
    template = resolve_chat_template(cfg.chat_template)  # a family name becomes its template
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.padding_side = "right"
    return tokenizer


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
# GGUF files as a base: converted once into a cached safetensors folder, then loaded like any folder

GGUF_MIN_VERSION = "0.13.0"  # 0.11 and older fail under numpy 2 (memmap.newbyteorder); tested 0.13-0.19
GGUF_FORMAT_VERSION = 1  # bump when the converted folder's layout changes: old cache entries are not reused


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


_gguf_session_depth = 0


@contextmanager
def gguf_session() -> Iterator[None]:
    """Within this block every ``gguf.GGUFReader(path)`` of one path is the same reader, and gguf's tensor
    name maps are computed once. Parsing the header of a 49k-token GGUF takes seconds (its vocabulary is
    read element by element), and transformers parses it anew for the config, the tokenizer and the tensors;
    its name mapping rebuilds gguf's map for every submodule. This keeps a conversion to one parse."""
    global _gguf_session_depth
    import gguf

    if _gguf_session_depth:
        yield
        return
    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(real_name_map)
    _gguf_session_depth += 1
    try:
        yield
    finally:
        _gguf_session_depth -= 1
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _gguf_reader(name: str) -> Any:
    """The GGUF file's reader (memory-mapped: nothing is read but the header). Raises ``ModelError``."""
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"base_model GGUF file not found: {name}")
    if not path.is_file():
        raise ModelError(f"base_model {name} ends in .gguf but is not a file")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(
            f"base_model {name} is a GGUF file; reading it needs the gguf package: pip install 'gguf>={GGUF_MIN_VERSION}'"
        ) from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"base_model {name} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises whatever numpy/struct raise on a cut file
        raise ModelError(f"GGUF file {name} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size or not reader.tensors:
        raise ModelError(
            f"GGUF file {name} is truncated: its tensors need {end:,} bytes, the file has {size:,}"
            if reader.tensors
            else f"GGUF file {name} holds no tensors"
        )
    return reader


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8", "replace") if field.types and field.types[0].name == "STRING" else value


def check_gguf(name: str, need_tokenizer: bool = True) -> None:
    """Everything that can be wrong with a GGUF base, checked without writing anything (``ModelError``):
    not there, not GGUF, cut short, an architecture transformers cannot read from GGUF, no tokenizer."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        _gguf_reader(name)  # raises the missing-package error after the file checks
    with gguf_session():
        _check_gguf(name, need_tokenizer)


def _check_gguf(name: str, need_tokenizer: bool) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    reader = _gguf_reader(name)
    architecture = _gguf_field(reader, "general.architecture")
    if architecture is None:
        raise ModelError(f"GGUF file {name} names no architecture (general.architecture)")
    try:
        config = _gguf_config(name)
    except ValueError as e:
        if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"GGUF file {name}: architecture {architecture!r} cannot be read from GGUF by transformers "
                f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
            ) from None
        raise ModelError(f"cannot read GGUF file {name}: {str(e).splitlines()[0]}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ModelError(f"GGUF file {name}: {type(config).__name__} ({architecture}) is not a causal language model")
    if need_tokenizer and "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelError(
            f"GGUF file {name} has no tokenizer (no tokenizer.ggml.* metadata); set tokenizer: to a tokenizer folder"
        )


def _gguf_config(name: str) -> Any:
    from transformers import AutoConfig

    path = Path(name).expanduser()
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf_config(name: str) -> Any:
    """The transformers config held in a GGUF file's metadata (nothing converted, nothing written)."""
    with gguf_session():
        check_gguf(name, need_tokenizer=False)
        return _gguf_config(name)


def cache_dir() -> Path:
    """Where qlora keeps what it derives from inputs: ``$QLORA_CACHE``, else ``$XDG_CACHE_HOME/qlora``."""
    if os.environ.get("QLORA_CACHE"):
        return Path(os.environ["QLORA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora"


def gguf_cache_folder(name: str, dtype: str) -> Path:
    """Where ``gguf_folder`` keeps the conversion of ``name`` to ``dtype`` (it may not exist yet)."""
    path = Path(name).expanduser().resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{GGUF_FORMAT_VERSION}"
    return cache_dir() / "gguf" / f"{path.stem}-{dtype}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def gguf_folder(name: str, dtype: str, need_tokenizer: bool = True) -> Path:
    """The GGUF file ``name`` as a transformers model folder (config.json, model.safetensors with every tensor
    dequantized to ``dtype``, the tokenizer with its chat template, generation_config.json), converted on
    first use into ``cache_dir()/gguf/`` and reused while the file keeps its path, size and mtime.

    Conversion streams tensor by tensor (the file is memory-mapped, each tensor dequantized, converted and
    appended to disk), so memory holds one tensor at a time, never the whole dequantized model. Nothing is
    written before the file has passed ``check_gguf``; a failed conversion leaves nothing behind.
    """
    if not Path(name).expanduser().is_file():
        check_gguf(name)  # raises the one-line error
    folder = gguf_cache_folder(name, dtype)
    if (folder / "config.json").exists():  # a folder appears only once complete
        return folder
    with gguf_session():
        check_gguf(name, need_tokenizer=need_tokenizer)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
        try:
            convert_gguf(Path(name).expanduser().resolve(), tmp, DTYPES[dtype])
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same conversion first
                if not (folder / "config.json").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def convert_gguf(path: Path, out: Path, dtype: torch.dtype) -> None:
    """Write ``path`` (GGUF) into the empty folder ``out`` as a transformers model folder, one tensor in memory
    at a time. Names, the q/k un-permutation and other per-architecture fixes are transformers' own
    (``modeling_gguf_pytorch_utils``), applied as ``from_pretrained(gguf_file=...)`` applies them."""
    import numpy as np
    from gguf import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    reader = _gguf_reader(str(path))
    config = _gguf_config(str(path))
    config.dtype = dtype
    if "tokenizer.ggml.tokens" in reader.fields:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(out)
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # the metadata as transformers parses it
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    architecture = _gguf_field(reader, "general.architecture")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    parsed["tensors"] = {}
    code = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    data_path = out / "tensors.tmp"
    with open(data_path, "wb") as data:

        def append(hf_name: str, weights: Any) -> None:
            nonlocal offset
            t = torch.from_numpy(np.array(weights, copy=True)).to(dtype)  # (out, in), as transformers holds it
            raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            data.write(raw)
            header[hf_name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes

        for tensor in reader.tensors:
            weights = dequantize(tensor.data, tensor.tensor_type)  # float32 numpy, (out, in)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
            )
            if result.name in names and result.weights is not None:
                append(names[result.name], result.weights)
            del weights, result
        for hf_name, t in parsed["tensors"].items():  # processors that gather pieces (MoE experts) leave them here
            append(hf_name, t.numpy() if isinstance(t, torch.Tensor) else t)
    expected = {n for n, _ in skeleton.named_parameters()} | {n for n, _ in skeleton.named_buffers()}
    missing = sorted(n for n in expected if n not in header and not _tied(skeleton, n))
    if missing:
        raise ModelError(f"GGUF file {path}: no tensor for {missing[0]} ({len(missing)} missing); cannot convert it")
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as f, open(data_path, "rb") as data:
        f.write(struct.pack("<Q", len(raw)) + raw)
        shutil.copyfileobj(data, f, 16 << 20)
    data_path.unlink()
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    stat = path.stat()
    source = {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": str(dtype)}
    (out / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")


def _tied(model: Any, name: str) -> bool:
    """Whether parameter ``name`` is tied to another one (the output head to the embeddings) or a
    non-persistent buffer: a checkpoint need not hold it."""
    if name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False):
        return True
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf in getattr(module, "_non_persistent_buffers_set", set())


def resolve_gguf(cfg: ModelSettings) -> ModelSettings:
    """``cfg`` with a ``.gguf`` base replaced by its converted folder (dequantized to the compute dtype), whose
    tokenizer is then the default; any other base unchanged."""
    if not is_gguf(cfg.base_model):
        return cfg
    folder = gguf_folder(cfg.base_model, cfg.quant.compute_dtype, need_tokenizer=cfg.tokenizer is None)
    return replace(cfg, base_model=str(folder))


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
