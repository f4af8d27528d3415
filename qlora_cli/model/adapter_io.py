"""Adapters on disk in PEFT's format, so ``peft.PeftModel.from_pretrained`` and vLLM load them as they are.

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                                base_model.model.<module path>.lora_B.weight  (out, r)
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, ...

The key mapping and the adapter <-> module fit check live here and only here: ``to_peft_key`` /
``from_peft_key`` / ``adapter_modules`` map keys, ``check_fit`` checks an adapter against a model's modules for
every command that loads one (train's resume, eval, merge, serve, inspect).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qlora_cli.config import LoRASettings
from qlora_cli.errors import ModelError
from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora_cli.model.lora import (
    LoRALinear,
    adapter_state_dict,
    inject_lora,
    linear_module_names,
    linear_shape,
    lora_layers,
    match_targets,
    suffixes,
)
from qlora_cli.model.token_rows import (
    ROWS_KEY,
    TrainedCopy,
    copy_rows,
    heads_tied,
    is_copy_key,
    load_rows,
    resize_for,
    row_modules,
    rows_state_dict,
    train_copies,
)

# vLLM's accepted --max-lora-rank values (vllm.config.lora.MaxLoRARanks); older releases accept fewer.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

PEFT_PREFIX = "base_model.model."


def to_peft_key(key: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``base_model.model.model.layers.0...lora_A.weight``."""
    return PEFT_PREFIX + key


def from_peft_key(key: str) -> str:
    """The inverse of ``to_peft_key``; also accepts PEFT's in-memory form with an adapter name (``lora_A.default``)."""
    if not key.startswith(PEFT_PREFIX):
        raise ModelError(f"adapter key {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT LoRA adapter")
    key = key[len(PEFT_PREFIX) :]
    for which in ("lora_A", "lora_B"):
        key = key.replace(f".{which}.default.", f".{which}.")
    return key.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")


MAGNITUDE = ".lora_magnitude_vector"  # DoRA's per-row magnitude, PEFT's key suffix in adapter files


def adapter_magnitudes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module: m (out,)}`` of a DoRA adapter's magnitudes (empty for plain LoRA)."""
    return {k[: -len(MAGNITUDE)]: v for k, v in state.items() if k.endswith(MAGNITUDE)}


def refuse_dora(config: dict[str, Any], where: str, what: str) -> None:
    """One ``ModelError`` line where a command cannot take a DoRA adapter yet."""
    if config.get("use_dora"):
        raise ModelError(f"{where} is a DoRA adapter (use_dora), which {what} does not take yet")


def refuse_rows(config: dict[str, Any], state: Mapping[str, Any], where: str, what: str) -> None:
    """One ``ModelError`` line where a command cannot take trained token rows (new tokens) yet."""
    if config.get("modules_to_save") or any(is_copy_key(k) for k in state):
        raise ModelError(
            f"{where} trains full copies of {', '.join(config.get('modules_to_save') or ['the embedding'])} "
            f"(modules_to_save), which {what} does not take yet; merge it (qlora merge) and use the merged model"
        )
    if config.get("trainable_token_indices") or any(k.endswith(ROWS_KEY) for k in state):
        raise ModelError(
            f"{where} trains token rows (tokens / special_tokens / trainable_token_indices), which {what} does not "
            "take yet; merge it (qlora merge) and use the merged model as the base"
        )


def adapter_modules(
    state: dict[str, torch.Tensor], where: str, strict: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"<module>.lora_A.weight": A, "<module>.lora_B.weight": B}`` (our keys, as ``read_adapter`` returns
    them) -> ``{module: (A (r, in), B (out, r))}``. ``where`` names the adapter in the ``ModelError`` raised
    for a tensor that is not a LoRA weight (skipped instead when not ``strict``: ``inspect`` reports it), a
    module with only one of the two, or no weights at all."""
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith((MAGNITUDE, ROWS_KEY)) or is_copy_key(key):  # DoRA's magnitudes, token rows, full copies
            continue
        module, sep, rest = key.rpartition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight"):
            if not strict:
                continue
            raise ModelError(f"{where}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        saved.setdefault(module, {})[rest[0]] = tensor
    if not saved:
        raise ModelError(f"{where} holds no LoRA weights")
    for module, pair in saved.items():
        if set(pair) != {"A", "B"}:
            raise ModelError(f"{where} has no lora_{'B' if 'A' in pair else 'A'} weight for {module!r}")
    return {m: (p["A"], p["B"]) for m, p in saved.items()}


def check_fit(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    r: int,
    linear: Mapping[str, torch.nn.Module],
    targeted: Callable[[], Iterable[str]],
    where: str,
    misfit: str = "does not fit the base model",
) -> list[str]:
    """Raise ``ModelError`` unless the adapter's ``modules`` (``adapter_modules``) fit the model exactly: each
    is a linear layer in ``linear`` ({name: layer}) with A (r, in) and B (out, r), and they are exactly the
    modules its target_modules select, ``targeted()`` (called once the modules are known to exist, so a
    wrong base is reported by module name first). ``where`` names the adapter, ``misfit`` the model.
    Returns the targeted module names."""
    for module, (lora_A, lora_B) in modules.items():
        for which, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ModelError(
                    f"{where}: {module}.{which} holds {bad} NaN/inf value(s); the training that saved it diverged "
                    "(use an earlier checkpoint: checkpoints/step-N)"
                )
        if module not in linear:
            raise ModelError(f"{where} {misfit}: no linear module named {module!r}")
        n_in, n_out, _ = linear_shape(linear[module])
        for which, tensor, need in (("lora_A", lora_A, (r, n_in)), ("lora_B", lora_B, (n_out, r))):
            if tuple(tensor.shape) != need:
                raise ModelError(
                    f"{where} {misfit}: {module}.{which} has shape {tuple(tensor.shape)}, the base needs {need}"
                )
    targeted = list(targeted())
    not_saved = [n for n in targeted if n not in modules]
    if not_saved:
        raise ModelError(f"{where} has no weights for targeted module {not_saved[0]!r}")
    extra = [m for m in modules if m not in targeted]
    if extra:
        raise ModelError(f"{where} has weights for {extra[0]!r}, which its target_modules do not match")
    return targeted


def targeted_modules(model: torch.nn.Module, settings: LoRASettings, where: str) -> list[str]:
    """The modules ``settings`` targets in ``model`` (``lora.match_targets``), a misfit error naming ``where``."""
    try:
        return match_targets(model, settings.target_modules)
    except ModelError as e:
        raise ModelError(f"{where} does not fit the base model: {e}") from None


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name: layer} of every linear layer an adapter may target, the output head included (PEFT allows it)."""
    return {n: model.get_submodule(n) for n in linear_module_names(model, include_head=True)}


def peft_adapter_config(
    settings: LoRASettings, target_names: list[str], base_model: str, fan_in_fan_out: bool
) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` fields for this adapter. ``target_modules`` lists the module-name suffixes, which
    is how PEFT and vLLM match them (``all-linear`` is resolved to the names it found)."""
    targets = suffixes(target_names) if settings.target_modules == "all-linear" else list(settings.target_modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": settings.use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": settings.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }


def saved_settings(settings: LoRASettings) -> LoRASettings:
    """The adapter as written to disk: a PiSSA / OLoRA start in PEFT's converted form has twice the rank and the
    same scaling (alpha doubled, or times √2 with rsLoRA, as PEFT's ``save_pretrained`` converts it)."""
    if not settings.offset_start:
        return settings
    alpha = settings.alpha * (2**0.5 if settings.use_rslora else 2)
    return replace(settings, r=2 * settings.r, alpha=alpha, init="default")


def split_offsets(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], r: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The inverse of the converted form (``lora.adapter_state_dict``): ``{module: (A', B')}`` of rank 2r ->
    the trained (A, B) and the frozen start (A₀, B₀), exactly (slices and a negation)."""
    trained = {m: (a[:r], b[:, :r]) for m, (a, b) in modules.items()}
    offsets = {m: (a[r:].clone(), -b[:, r:]) for m, (a, b) in modules.items()}
    return trained, offsets


def save_adapter(model: torch.nn.Module, out_dir: str | Path, settings: LoRASettings, base_model: str) -> None:
    """Write adapter weights and config into ``out_dir``; each file lands atomically (temp file + rename)."""
    settings = saved_settings(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = list(lora_layers(model))
    if not layers:
        raise ModelError("the model has no LoRA layers to save")
    tensors = {**adapter_state_dict(model), **rows_state_dict(model)}
    state, seen = {}, set()
    for k, v in tensors.items():
        v = v.to("cpu", torch.float32).contiguous()
        state[to_peft_key(k)] = v.clone() if v.data_ptr() in seen else v  # a tied copy: saved under both keys
        seen.add(v.data_ptr())
    fan_in_fan_out = any(m.fan_in_fan_out for _, m in layers)
    config = peft_adapter_config(settings, [n for n, _ in layers], base_model, fan_in_fan_out)
    wrapped = dict(row_modules(model))
    rows = {k[: -len(ROWS_KEY)]: k for k in rows_state_dict(model) if k.endswith(ROWS_KEY)}
    if rows:  # PEFT's trainable tokens: {module name: ids}, the same ids in each
        config["trainable_token_indices"] = {n.rsplit(".", 1)[-1]: wrapped[n].indices.tolist() for n in rows}
    copies = [n for n, m in wrapped.items() if isinstance(m, TrainedCopy)]
    if copies:  # PEFT's modules_to_save; a copy shared by a tied head and embedding: ensure_weight_tying
        config["modules_to_save"] = [n.rsplit(".", 1)[-1] for n in copies]
        config["ensure_weight_tying"] = heads_tied(model)
    _atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic_write(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the adapter from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, {our key: tensor}) from a PEFT-format folder. Raises ``ModelError``."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ModelError(f"adapter folder not found: {adapter_dir}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).exists():
            raise ModelError(f"adapter folder {adapter_dir} is missing {name}")
    config = read_adapter_config(folder)
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{folder / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ModelError(f"{folder}: per-module rank_pattern/alpha_pattern is not supported")
    state = {from_peft_key(k): v for k, v in read_adapter_weights(folder / ADAPTER_WEIGHTS).items()}
    return config, state


def read_adapter_config(folder: Path, required: tuple[str, ...] = ("r", "lora_alpha", "target_modules")) -> dict:
    """adapter_config.json as a dict, with the ``required`` keys; ``ModelError`` for malformed JSON or a missing
    key. Nothing else is checked here (``inspect`` reports what vLLM would refuse instead of refusing it)."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{folder / ADAPTER_CONFIG}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{folder / ADAPTER_CONFIG}: not UTF-8 text") from None
    if not isinstance(config, dict):
        raise ModelError(f"{folder / ADAPTER_CONFIG}: expected a JSON object, got {type(config).__name__}")
    for key in required:
        if key not in config:
            raise ModelError(f"{folder / ADAPTER_CONFIG} is missing {key!r}")
    return config


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter_model.safetensors`` under PEFT's keys; ``ModelError`` for a damaged file."""
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors (a pickle renamed), unreadable
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{path} cannot be read as safetensors ({reason})") from None


def settings_from_peft_config(config: dict[str, Any]) -> LoRASettings:
    targets = config["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        raise ModelError(f"adapter target_modules is a regex ({targets!r}); qlora reads lists of module names")
    return LoRASettings(
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=targets,
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
    )


def load_adapter(
    model: torch.nn.Module,
    adapter_dir: str | Path,
    adapter: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
) -> list[str]:
    """Inject LoRA layers matching the saved adapter into ``model`` and load its weights. ``adapter``: the folder's
    (config, tensors) as ``read_adapter`` gave them (``RunFolder.adapter``), so the files are not read again.

    The adapter must fit the base exactly (``check_fit``). Returns the wrapped module names.
    """
    config, state = adapter if adapter is not None else read_adapter(adapter_dir)
    settings = settings_from_peft_config(config)
    where = f"adapter {adapter_dir}"
    modules = adapter_modules(state, where)
    check_fit(modules, settings.r, linear_modules(model), lambda: targeted_modules(model, settings, where), where)
    spec = token_spec(config, where)
    copies = copy_spec(config, state, where)
    if spec and copies:
        raise ModelError(
            f"{where} trains both token rows and full copies (modules_to_save); qlora reads one or the other"
        )
    if spec:  # new tokens: the base grows to hold them before anything is wrapped
        resize_for(model, max(max(ids) for ids in spec.values()) + 1)
    if copies:  # full copies of a grown vocabulary: the base grows to their rows
        resize_for(model, max(int(state[k].shape[0]) for k in state if is_copy_key(k)))
    names = inject_lora(model, settings)
    layers: dict[str, LoRALinear] = dict(lora_layers(model))
    copy_weights(layers, modules, adapter_magnitudes(state), settings.use_dora, where)
    if spec:
        load_rows(model, spec, state, where)
    elif any(k.endswith(ROWS_KEY) for k in state):
        raise ModelError(f"{where} has trained token rows but no trainable_token_indices in its config")
    if copies:
        tied = heads_tied(model)
        keys = [k for k in state if is_copy_key(k)]
        embed_key = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
        if tied and (embed_key not in keys or (len(keys) == 1 and not config.get("ensure_weight_tying"))):
            raise ModelError(
                f"{where} copies {', '.join(copies)} of a model whose head and embedding share one weight, without "
                "PEFT's ensure_weight_tying, which unties them; qlora keeps them tied: not loaded"
            )
        train_copies(model, copies)
        if tied and len(keys) > 1 and not config.get("ensure_weight_tying"):
            first = state[keys[0]]
            if any(not torch.equal(state[k], first) for k in keys[1:]):
                raise ModelError(
                    f"{where} holds two different copies of a tied embedding and head (PEFT without "
                    "ensure_weight_tying); qlora keeps them tied"
                )
        if tied and len(keys) == 1:  # one copy of a tied weight: the head shares it
            state = {**state, **{k: state[keys[0]] for k in rows_state_dict(model) if k not in state}}
        copy_rows(model, state, where)
    return names


def copy_spec(config: dict[str, Any], state: Mapping[str, torch.Tensor], where: str) -> list[str]:
    """PEFT's ``modules_to_save`` (module names' last parts), checked against the file's full copies."""
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelError(f"{where}: modules_to_save is not a list of module names")
    keys = [k for k in state if is_copy_key(k)]
    for key in keys:
        if key[: -len(".weight")].rsplit(".", 1)[-1] not in names:
            raise ModelError(f"{where}: unexpected tensor {key!r} (not a LoRA weight nor one of modules_to_save)")
    if names and not keys:
        raise ModelError(f"{where} names modules_to_save {names} but holds none of their weights")
    return names


def token_spec(config: dict[str, Any], where: str) -> dict[str, list[int]]:
    """PEFT's ``trainable_token_indices`` as {module name: ids} (a bare list means the input embedding)."""
    spec = config.get("trainable_token_indices") or {}
    if isinstance(spec, list):
        spec = {"embed_tokens": spec}
    if not isinstance(spec, dict) or not all(
        isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0 for i in ids) for ids in spec.values()
    ):
        raise ModelError(f"{where}: trainable_token_indices is not a list of token ids per module")
    return spec


def copy_weights(
    layers: dict[str, LoRALinear],
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    magnitudes: Mapping[str, torch.Tensor],
    use_dora: bool,
    where: str,
) -> None:
    """Saved A, B (and DoRA's magnitudes) into the LoRA layers; ``ModelError`` for a magnitude missing, extra
    or of the wrong length."""
    if use_dora != bool(magnitudes):
        what = "has no lora_magnitude_vector weights" if use_dora else "has DoRA magnitudes but use_dora is off"
        raise ModelError(f"{where} {what}")
    with torch.no_grad():
        for name, (lora_A, lora_B) in modules.items():
            layer = layers[name]
            layer.lora_A.weight.copy_(lora_A.to(torch.float32))
            layer.lora_B.weight.copy_(lora_B.to(torch.float32))
            if use_dora:
                m = magnitudes.get(name)
                if m is None or tuple(m.shape) != (layer.out_features,):
                    raise ModelError(f"{where}: {name}.lora_magnitude_vector is missing or not ({layer.out_features},)")
                layer.lora_magnitude_vector.copy_(m.to(torch.float32))


def load_start_adapter(model: torch.nn.Module, adapter_dir: str | Path, settings: LoRASettings, key: str) -> None:
    """Copy a saved adapter's weights into the LoRA layers ``inject_lora(model, settings)`` made: the start
    (and reference) of preference tuning on top of an earlier run. Its rank, alpha and rsLoRA must be the run's
    and its modules exactly the ones the run targets. ``key`` names the config key in the ``ModelError``."""
    folder = Path(adapter_dir).expanduser()
    config, state = read_adapter(folder)
    saved = settings_from_peft_config(config)
    where = f"{key} {adapter_dir}"
    mine = (settings.r, settings.alpha, settings.use_rslora)
    if saved.use_dora != settings.use_dora:
        raise ModelError(f"{where}: use_dora is {saved.use_dora} there and {settings.use_dora} in this config")
    if (saved.r, saved.alpha, saved.use_rslora) != mine:
        raise ModelError(
            f"{where} has lora_r {saved.r}, lora_alpha {saved.alpha:g}, lora_use_rslora {saved.use_rslora}; this "
            f"config has {mine[0]}, {mine[1]:g}, {mine[2]}: set the same, the policy starts from that adapter"
        )
    refuse_rows(config, state, where, "preference tuning from an earlier run")
    layers: dict[str, LoRALinear] = dict(lora_layers(model))
    modules = adapter_modules(state, where)
    check_fit(modules, saved.r, {**linear_modules(model), **layers}, lambda: list(layers), where)
    copy_weights(layers, modules, adapter_magnitudes(state), saved.use_dora, where)
