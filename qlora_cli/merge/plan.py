"""Which base tensors the adapter changes: the base folder, its config and meta-device skeleton, and the
adapter checked against it (``adapter_io.check_fit``) and mapped to base tensor names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_cli.config import QuantSettings
from qlora_cli.errors import ModelError
from qlora_cli.layout import MODEL_CONFIG
from qlora_cli.merge.safetensors_stream import FLOAT_CODES, TensorInfo
from qlora_cli.model.adapter_io import (
    adapter_magnitudes,
    adapter_modules,
    check_fit,
    copy_spec,
    linear_modules,
    settings_from_peft_config,
    targeted_modules,
    token_spec,
)
from qlora_cli.model.loading import is_local
from qlora_cli.model.lora import linear_shape, output_head
from qlora_cli.model.token_rows import ROWS_KEY, heads_tied, is_copy_key

# ---------------------------------------------------------------------------------------------
# which base tensors the adapter changes


@dataclass
class Target:
    module: str  # adapter module path, e.g. model.layers.0.self_attn.q_proj
    tensor: str  # base tensor name
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    conv1d: bool  # the base shard stores this weight (in, out)
    quantized: bool  # the run held this layer in 4 bits
    magnitude: torch.Tensor | None = None  # DoRA: (out,), folded in as m / ‖W + s·BA‖_row per row


@dataclass
class RowsTarget:
    """An embedding (or output head) the run resized for new tokens and whose rows ``indices`` it trained."""

    module: str
    tensor: str  # base tensor name
    size: int  # rows after growing (the base's, or the highest trained id + 1)
    indices: torch.Tensor  # (n,) long
    rows: torch.Tensor | None  # (n, dim) float32; None: grown only (an untied head the adapter does not train)


def resolve_base_folder(name: str) -> Path:
    """A local folder for the base: the folder itself, or a hub id's snapshot in the local Hugging Face cache."""
    if is_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"base model folder not found: {name}")
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
        raise ModelError(
            f"base model {name} is not a local folder and is not in the Hugging Face cache; "
            f"download it first (hf download {name}) or pass --base /path/to/model"
        ) from None


def read_base_config(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_CONFIG
    if not path.exists():
        raise ModelError(f"base model folder {folder} has no config.json")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ModelError(f"{path}: malformed JSON ({e})") from None
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ModelError(
            f"base model {folder} is a pre-quantized ({method}) checkpoint; merge needs the 16-bit original weights"
        )
    return config


def model_skeleton(folder: Path, trust_remote_code: bool) -> Any:
    """The base model's module tree on the meta device (no memory): which layers are Conv1D, their shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read base model {folder}: {str(e).splitlines()[0]}") from None


def not_quantized_modules(skeleton: Any) -> list[str]:
    """Module-name patterns transformers leaves unquantized when it loads a model in 4 bits (the output head,
    tied weights, the model's keep-in-fp32 modules)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        keys = list(get_keys_to_not_convert(skeleton))
    except Exception:  # noqa: BLE001 - private API; fall back to its main rule
        keys = [n for n, m in skeleton.named_modules() if m is output_head(skeleton)]
    keys += list(getattr(skeleton, "_keep_in_fp32_modules", None) or [])
    return keys


def is_quantized_in_training(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return bool(should_convert_module(name, skip))
    except ImportError:  # pragma: no cover - older transformers
        return not any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in skip)


def base_tensor_name(module: str, skeleton: Any, tensors: dict[str, TensorInfo]) -> str | None:
    """The base tensor holding ``module``'s weight: ``<module>.weight``, or that name with the model's
    base-model prefix (``transformer.``, ``model.``) removed or added, as older checkpoints store it."""
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    candidates = [f"{module}.weight"]
    if prefix and module.startswith(prefix + "."):
        candidates.append(f"{module[len(prefix) + 1 :]}.weight")
    elif prefix:
        candidates.append(f"{prefix}.{module}.weight")
    return next((c for c in candidates if c in tensors), None)


def plan_targets(
    adapter_dir: Path,
    adapter_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    skeleton: Any,
    tensors: dict[str, TensorInfo],
    quant: QuantSettings,
) -> tuple[dict[str, Target], float]:
    """{base tensor name: Target} and the scaling, after checking the adapter fits the base exactly.

    Raises ``ModelError`` naming the first module that does not fit (missing, wrong shape, tied, not float).
    """
    settings = settings_from_peft_config(adapter_config)
    where = f"adapter {adapter_dir}"
    fits = f"{where} does not fit the base model"
    saved = adapter_modules(state, where)
    magnitudes = adapter_magnitudes(state)
    if settings.use_dora and set(magnitudes) != set(saved):
        raise ModelError(f"{where} is a DoRA adapter without a lora_magnitude_vector for every module")
    targeted = check_fit(
        saved, settings.r, linear_modules(skeleton), lambda: targeted_modules(skeleton, settings, where), where
    )
    modules = dict(skeleton.named_modules())
    head = output_head(skeleton)
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    skip = not_quantized_modules(skeleton) if quant.load_in_4bit else []
    targets: dict[str, Target] = {}
    for name in targeted:
        module = modules[name]
        n_in, n_out, conv1d = linear_shape(module)
        A, B = saved[name]
        if module is head and tied:
            raise ModelError(
                f"adapter targets {name!r}, whose weight is tied to the input embeddings; merging would change both"
            )
        key = base_tensor_name(name, skeleton, tensors)
        if key is None:
            raise ModelError(f"{fits}: the base model has no weight for module {name!r} (looked for {name}.weight)")
        info = tensors[key]
        need = (n_in, n_out) if conv1d else (n_out, n_in)
        if info.shape != need:
            raise ModelError(f"{fits}: base tensor {key} has shape {info.shape}, the adapter needs {need}")
        if info.dtype not in FLOAT_CODES:
            raise ModelError(f"base tensor {key} is {info.dtype}; merge needs 16- or 32-bit float base weights")
        quantized = quant.load_in_4bit and is_quantized_in_training(name, skip)
        m = magnitudes[name].float() if settings.use_dora else None
        if m is not None and tuple(m.shape) != (n_out,):
            raise ModelError(f"{fits}: {name}.lora_magnitude_vector has shape {tuple(m.shape)}, needs ({n_out},)")
        targets[key] = Target(name, key, A.float(), B.float(), conv1d, quantized, m)
    return targets, settings.scaling


def plan_rows(
    adapter_dir: Path, adapter_config: dict[str, Any], state: dict[str, torch.Tensor], skeleton: Any,
    tensors: dict[str, TensorInfo],
) -> dict[str, RowsTarget]:  # fmt: skip
    """{base tensor name: RowsTarget} for an adapter with trained token rows (``trainable_token_indices``): the
    embedding, and the output head when it is untied (grown, and its rows replaced where the adapter trained
    them) or stored beside a tied embedding. Empty for an adapter without. ``ModelError`` for rows that do not
    fit, as ``load_adapter`` would raise it."""
    where = f"adapter {adapter_dir}"
    if copy_spec(adapter_config, state, where):  # whole copies (modules_to_save): each replaces its tensor
        return plan_copies(where, adapter_config, state, skeleton, tensors)
    spec = token_spec(adapter_config, where)
    saved = {k[: -len(ROWS_KEY)]: v for k, v in state.items() if k.endswith(ROWS_KEY)}
    if not spec:
        if saved:
            raise ModelError(f"{where} has trained token rows but no trainable_token_indices in its config")
        return {}
    ids = next(iter(spec.values()))
    if any(other != ids for other in spec.values()):
        raise ModelError(f"{where}: trainable_token_indices differ between modules; qlora trains the same rows in each")
    embed, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    names = {id(m): n for n, m in skeleton.named_modules()}
    embed_name = names[id(embed)]
    size = max(embed.num_embeddings, max(ids) + 1)
    indices = torch.tensor(ids, dtype=torch.long)
    width = embed.embedding_dim

    def rows_of(module: str) -> torch.Tensor:
        values = saved.get(module)
        if values is None:
            raise ModelError(f"{where} has no trained rows for {module!r}")
        if tuple(values.shape) != (len(ids), width):
            raise ModelError(f"{where}: {module}{ROWS_KEY} has shape {tuple(values.shape)}, not {(len(ids), width)}")
        return values.float()

    def target(module: str, rows: torch.Tensor | None) -> RowsTarget:
        key = base_tensor_name(module, skeleton, tensors)
        if key is None:
            raise ModelError(f"base model has no weight for {module!r}, whose token rows {where} trains")
        if tensors[key].dtype not in FLOAT_CODES or tensors[key].shape[1:] != (width,):
            raise ModelError(f"base tensor {key} is not a float ({embed.num_embeddings}, {width}) embedding")
        return RowsTarget(module, key, size, indices, rows)

    rows = rows_of(embed_name)
    found = [target(embed_name, rows)]
    if head is not None:
        head_name = names[id(head)]
        if heads_tied(skeleton) or getattr(
            skeleton.config, "tie_word_embeddings", False
        ):  # one weight: a copy stored beside it gets the same rows
            key = base_tensor_name(head_name, skeleton, tensors)
            if key is not None and key != found[0].tensor:
                found.append(target(head_name, rows))
        else:
            trained = head_name in saved or len(spec) > 1
            found.append(target(head_name, rows_of(head_name) if trained else None))
    unknown = set(saved) - {t.module for t in found}
    if unknown:
        raise ModelError(
            f"{where}: trained rows for {sorted(unknown)[0]!r}, which is not this model's embedding or head"
        )
    return {t.tensor: t for t in found}


def plan_copies(
    where: str, config: dict[str, Any], state: dict[str, torch.Tensor], skeleton: Any, tensors: dict[str, TensorInfo]
) -> dict[str, RowsTarget]:
    """{base tensor name: RowsTarget} replacing each whole copied module's tensor (grown where the run added
    tokens); a tied head's copy has no tensor of its own and shares the embedding's (which must be copied too,
    with ``ensure_weight_tying``, as qlora writes it)."""
    found: dict[str, RowsTarget] = {}
    head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    names = {id(m): n for n, m in skeleton.named_modules()}
    head_name, embed_name = names.get(id(head)), names[id(embed)]
    keys = [k for k in state if is_copy_key(k)]
    tied = heads_tied(skeleton) or bool(getattr(skeleton.config, "tie_word_embeddings", False))
    if tied and (f"{embed_name}.weight" not in keys or (len(keys) == 1 and not config.get("ensure_weight_tying"))):
        raise ModelError(
            f"{where} copies a tied embedding or head without PEFT's ensure_weight_tying, which unties them; "
            "qlora merges tied copies only"
        )
    for key in keys:
        module = key[: -len(".weight")]
        if module not in (embed_name, head_name):
            raise ModelError(f"{where} trains {module!r} whole; qlora merges copies of the embedding and head only")
        values = state[key].float()
        tensor = base_tensor_name(module, skeleton, tensors)
        if tensor is None and module == head_name and tied:
            continue
        if tensor is None:
            raise ModelError(f"base model has no weight for {module!r}, which {where} trains whole")
        if tensors[tensor].shape[1:] != tuple(values.shape[1:]) or values.shape[0] < tensors[tensor].shape[0]:
            raise ModelError(
                f"{where}: {key} has shape {tuple(values.shape)}; base tensor {tensor} is {tensors[tensor].shape}"
            )
        found[tensor] = RowsTarget(module, tensor, int(values.shape[0]), torch.arange(values.shape[0]), values)
    return found
