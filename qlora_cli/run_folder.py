"""A run folder (what ``qlora train`` wrote), or any folder holding a PEFT LoRA adapter.

Every later command (merge, eval, inspect, serve) starts here: ``open_run`` reads the adapter config and,
when present, the training config, and says which base model and tokenizer to load and how the base was
quantized during training, so the adapter is applied to the weights it learned against.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from qlora_cli.config import ModelSettings, RunConfig, load_config
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BEST_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_CONFIG,
    TOKENIZER_FILES,
)
from qlora_cli.model.adapter_io import load_adapter, read_adapter

RUN_CONFIG_KEYS = frozenset({"base_model", "datasets", "output_dir", "lora_r", "learning_rate"})
# metrics.jsonl fields that are numbers when qlora wrote them; a record where one is anything else is not ours
_COUNT_KEYS = ("step", "steps", "epoch", "bad_steps", "best_step", "eval_tokens", "train_examples", "processes")
_NUMBER_KEYS = ("loss", "train_loss", "eval_loss", "best_eval_loss", "eval_ppl", "lr", "grad_norm", "elapsed_sec")


def is_run_folder(path: str | Path) -> bool:
    """A folder ``qlora train`` wrote: its metrics log and the resolved config it writes first, every key at the
    start of a line. Only such a folder may be replaced (``--force``) or resumed; a folder that merely holds
    files of the same names (a project folder, ``/``) is not one."""
    p = Path(path)
    config = p / CONFIG_FILE
    if not (p / METRICS_FILE).is_file() or not config.is_file() or config.stat().st_size > 1 << 20:
        return False
    try:
        keys = {line.split(":", 1)[0] for line in config.read_text(encoding="utf-8").splitlines()}
    except (OSError, UnicodeDecodeError):
        return False
    return RUN_CONFIG_KEYS <= keys


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or of the run folder holding it) as qlora wrote them; [] when there is
    none. A line that is not one (cut by a crash, not UTF-8, not a JSON object, nested past the parser's depth,
    a step that is not an integer, a loss that is not a number) is skipped: a damaged or crafted log never
    stops a command."""
    file = Path(path)
    if file.is_dir():
        file = file / METRICS_FILE
    if not file.is_file():
        return []
    records = []
    for raw in file.read_bytes().splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(record, dict) and isinstance(record.get("type"), str) and _well_typed(record):
            records.append(record)
    return records


def _well_typed(record: dict[str, Any]) -> bool:
    for key in _COUNT_KEYS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return False
    for key in _NUMBER_KEYS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return False
    return True


def finite(value: Any) -> bool:
    """A real, finite number (not a bool): what a plot or a summary can use."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RunFolder:
    path: Path
    adapter_config: dict[str, Any]
    config: RunConfig | None  # the training config, when the folder came from `qlora train`
    model: ModelSettings  # how to load the base (and tokenizer) the adapter was trained on
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the adapter, read once: our keys

    @property
    def adapter(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(adapter config, tensors) as ``adapter_io.read_adapter`` gives them, without reading the files again."""
        return self.adapter_config, self.tensors


FolderKind = Literal["run", "checkpoint", "best", "adapter", "model", "gguf", "missing", "file", "other"]


def folder_kind(path: str | Path) -> FolderKind:
    """What ``path`` is, for the commands that take "a run, an adapter or a model": a run folder (``qlora train``'s),
    a checkpoint in one (``checkpoints/step-N``), its ``best/``, any other PEFT adapter folder (also one with a
    file missing: reading it says which), a transformers model folder (a merge's), a ``.gguf`` file, or none."""
    p = Path(path).expanduser()
    if not p.exists():
        return "missing"
    if not p.is_dir():
        return "gguf" if p.name.lower().endswith(".gguf") else "file"
    adapter = [(p / name).exists() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
    if all(adapter) or (any(adapter) and not (p / MODEL_CONFIG).exists()):  # a merged model may keep a stray one
        if is_run_folder(p):
            return "run"
        parent = parent_run(p)
        if parent is not None:
            return "checkpoint" if parent != p.resolve().parent else "best"
        return "adapter"
    return "model" if (p / MODEL_CONFIG).exists() else "other"


def parent_run(path: Path, there: Any = None) -> Path | None:
    """The run folder an adapter folder belongs to without being it: ``<run>/checkpoints/step-N`` or ``<run>/best``
    (neither carries a config: they trained as their run did). ``there(file)`` tests a file, as in ``open_run``."""
    there = there or (lambda f: f.exists())
    resolved = Path(path).expanduser().resolve()
    if resolved.parent.name == CHECKPOINTS_DIR:
        return resolved.parent.parent
    if resolved.name == BEST_DIR and there(resolved.parent / CONFIG_FILE):
        return resolved.parent
    return None


def open_run(path: str | Path, base: str | None = None, check: Any = None) -> RunFolder:
    """Read a run or adapter folder. ``base`` overrides the base model it names. Raises ``ModelError``.

    ``check(file) -> bool``: whether a file is there to be read, called on every file before it is looked at
    (serve passes one that raises for a file outside its --lora-root folders); default ``Path.exists``."""
    there = check or (lambda p: p.exists())
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"run folder not found: {path}")
    if not folder.is_dir():
        raise ModelError(f"expected a run folder, got a file: {path}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        there(folder / name)
    adapter_config, tensors = read_adapter(folder)  # checks both adapter files are there and readable
    config: RunConfig | None = None
    # a checkpoint (<run>/checkpoints/step-N) carries no config of its own: it trained as its run did
    # nor does the best adapter (<run>/best, save_best)
    run_dir = parent_run(folder, there)
    config_dir = folder if there(folder / CONFIG_FILE) else run_dir
    if config_dir is not None and there(config_dir / CONFIG_FILE):
        try:
            config = load_config(config_dir / CONFIG_FILE)
        except ConfigError as e:
            raise ModelError(f"run folder {config_dir}: {e}") from None
        settings = config.base
    else:
        name = adapter_config.get("base_model_name_or_path")
        if not name and base is None:
            raise ModelError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; pass the base model")
        settings = ModelSettings(base_model=name or "")
    if base is not None:
        settings = replace(settings, base_model=base)
    elif config is not None and Path(settings.base_model).is_absolute() and not Path(settings.base_model).exists():
        raise ModelError(
            f"the base model this run trained on, {settings.base_model}, is no longer there; "
            "pass its new location with --base PATH"
        )
    for candidate in (folder, run_dir):  # the run's tokenizer: its pad token and chat template
        if candidate is not None and any(there(candidate / f) for f in TOKENIZER_FILES):
            settings = replace(settings, tokenizer=str(candidate))
            break
    return RunFolder(folder, adapter_config, config, settings, tensors)


def load_adapted_model(run: RunFolder, device: torch.device, model: ModelSettings | None = None) -> tuple[Any, Any]:
    """(base + adapter in eval mode, tokenizer). ``model`` overrides how the base is loaded."""
    from qlora_cli.model.loading import load_base_model, load_tokenizer

    settings = model or run.model
    tokenizer = load_tokenizer(settings)
    base = load_base_model(settings, device)
    load_adapter(base, run.path, run.adapter)
    base.eval()
    return base, tokenizer
