"""A run folder (what ``qlora train`` wrote), or any folder holding a PEFT LoRA adapter.

Every later command (merge, eval, inspect, serve) starts here: ``open_run`` reads the adapter config and,
when present, the training config, and says which base model and tokenizer to load and how the base was
quantized during training, so the adapter is applied to the weights it learned against.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from qlora_cli.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter
from qlora_cli.checkpoint import BEST_DIR
from qlora_cli.config import ModelSettings, RunConfig, load_config
from qlora_cli.errors import ConfigError, ModelError

CONFIG_FILE = "qlora_config.yaml"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class RunFolder:
    path: Path
    adapter_config: dict[str, Any]
    config: RunConfig | None  # the training config, when the folder came from `qlora train`
    model: ModelSettings  # how to load the base (and tokenizer) the adapter was trained on


def is_adapter_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / ADAPTER_CONFIG).exists() and (p / ADAPTER_WEIGHTS).exists()


def open_run(path: str | Path, base: str | None = None) -> RunFolder:
    """Read a run or adapter folder. ``base`` overrides the base model it names. Raises ``ModelError``."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"run folder not found: {path}")
    if not folder.is_dir():
        raise ModelError(f"expected a run folder, got a file: {path}")
    adapter_config, _ = read_adapter(folder)  # checks both adapter files are there and readable
    config: RunConfig | None = None
    # a checkpoint (<run>/checkpoints/step-N) carries no config of its own: it trained as its run did
    # nor does the best adapter (<run>/best, save_best)
    resolved = folder.resolve()
    run_dir = resolved.parent.parent if resolved.parent.name == "checkpoints" else None
    if resolved.name == BEST_DIR and (resolved.parent / CONFIG_FILE).exists():
        run_dir = resolved.parent
    config_dir = folder if (folder / CONFIG_FILE).exists() else run_dir
    if config_dir is not None and (config_dir / CONFIG_FILE).exists():
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
        if candidate is not None and any((candidate / f).exists() for f in TOKENIZER_FILES):
            settings = replace(settings, tokenizer=str(candidate))
            break
    return RunFolder(folder, adapter_config, config, settings)


def load_adapted_model(run: RunFolder, device: torch.device, model: ModelSettings | None = None) -> tuple[Any, Any]:
    """(base + adapter in eval mode, tokenizer). ``model`` overrides how the base is loaded."""
    from qlora_cli.model import load_base_model, load_tokenizer

    settings = model or run.model
    tokenizer = load_tokenizer(settings)
    base = load_base_model(settings, device)
    load_adapter(base, run.path)
    base.eval()
    return base, tokenizer
