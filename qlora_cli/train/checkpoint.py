"""Atomic checkpoints and exact resume.

    output_dir/checkpoints/step-N/
        adapter_model.safetensors, adapter_config.json   the adapter (a usable PEFT folder on its own)
        optimizer.pt, scheduler.pt                       tensors/plain types: torch.load(weights_only=True)
        rng_state.pt, rng_state_1.pt, ...                each process's RNG states (torch, Python, NumPy)
        trainer_state.json                               step, data position, log window, processes,
                                                         config and its hash
        COMPLETE                                         written last: a folder without it is ignored

A checkpoint is written into a hidden temporary folder, every file flushed to disk, renamed into place,
then marked complete. Old checkpoints are deleted only after the new one is complete. Only the main process of
a job writes and reads them (what the others hold is gathered to it, and sent back on resume), so the nodes of a
multi-node job need no shared disk; under FSDP the adapter and optimizer state are saved whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_cli.config import RunConfig
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BEST_DIR,
    BEST_FILE,
    CHECKPOINTS_DIR,
    COMPLETE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    rng_file,
)
from qlora_cli.model.adapter_io import save_adapter
from qlora_cli.train.sharding import (
    from_main,
    full_adapter,
    full_optimizer_state,
    gather_to_main,
    shard_optimizer_state,
)

# Keys that may differ between the run that wrote a checkpoint and the run that resumes from it.
RESUMABLE_KEYS = frozenset(
    {
        "max_steps",
        "num_epochs",
        "save_steps",
        "save_total_limit",
        "logging_steps",
        "eval_steps",
        "resume_from_checkpoint",
        "output_dir",
        "max_bad_steps",
        "max_bad_fraction",
        "early_stopping_patience",
        "early_stopping_threshold",
        "save_best",
        "report_to",
        "run_name",
        "wandb_project",
        "wandb_entity",
    }
)


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done (skipped bad steps included)
    epoch: int = 0  # the epoch the next step reads from
    window: int = 0  # index of the next accumulation window within that epoch
    stream: list[int] = field(default_factory=lambda: [0, 0, 1, 0])  # streaming: dataset, block offset, line, steps
    log_loss: float = 0.0  # loss sum and target count since the last logged step
    log_targets: int = 0
    log_prefs: dict[str, float] = field(default_factory=dict)  # preference tuning: the log window's Sums
    bad_steps: int = 0  # non-finite steps skipped so far
    consecutive_bad: int = 0
    best_eval_loss: float | None = None  # early stopping / save_best: the best eval so far, its step,
    best_step: int | None = None  # and how many evals since it
    evals_since_best: int = 0
    processes: int = 0  # how many processes wrote the checkpoint (0: a checkpoint from before this was kept)
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    python_rng: list[Any] = field(default_factory=list)
    numpy_rng: list[Any] = field(default_factory=list)


def config_fingerprint(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """(hash, config dict) over the keys that must not change on resume."""
    data = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUMABLE_KEYS}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return digest, data


def _is_default(key: str, value: Any) -> bool:
    """Whether a config key a checkpoint predates holds its default (that run had the same behaviour)."""
    field = RunConfig.model_fields.get(key)
    if field is None:
        return False
    default = field.get_default(call_default_factory=True)
    return value == (default.model_dump(mode="json") if hasattr(default, "model_dump") else default)


def _capture_rng(state: TrainerState) -> dict[str, Any]:
    """This process's RNG states (torch's as tensors; Python's and NumPy's also kept in ``state``)."""
    py = random.getstate()
    state.python_rng = [py[0], list(py[1]), py[2]]
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state.numpy_rng = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    tensors: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "python": state.python_rng, "numpy": state.numpy_rng}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state_all()
    return tensors


def _restore_rng(state: TrainerState, tensors: dict[str, Any]) -> None:
    python, numpy = tensors.get("python") or state.python_rng, tensors.get("numpy") or state.numpy_rng
    if python:
        version, internal, gauss = python
        random.setstate((version, tuple(internal), gauss))
    if numpy:
        kind, keys, pos, has_gauss, cached = numpy
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["torch_cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: Path,
    cfg: RunConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    accelerator: Any = None,
    trained: Any = None,
    fsdp: bool = False,
) -> Path:
    """Write ``checkpoints/step-{state.step}`` atomically and prune old ones. Returns its path.

    Every process calls it. The main process alone writes: every process's RNG state is gathered to it, and under
    FSDP the adapter and optimizer state are gathered whole, so the other nodes of a job need no shared disk.
    """
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    state.processes = accelerator.num_processes if accelerator is not None else 1
    state.config_hash, state.config = config_fingerprint(cfg)
    rngs = gather_to_main(accelerator, _capture_rng(state))
    optimizer_state = full_optimizer_state(optimizer) if fsdp else optimizer.state_dict()

    def write() -> None:  # the main process; a failure there is raised on every process (none waits on it)
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for rank, rng in enumerate(rngs or []):
                torch.save(rng, tmp / rng_file(rank))
            save_adapter(model, tmp, cfg.lora, cfg.base_model)
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
            for f in tmp.iterdir():
                _fsync(f)
            if final.exists():  # a stale folder from an earlier attempt at this step
                shutil.rmtree(final)
            os.replace(tmp, final)
            (final / COMPLETE).write_text("")
            _fsync(final / COMPLETE)
            _fsync(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if cfg.save_total_limit:
            prune_checkpoints(output_dir, cfg.save_total_limit)

    with full_adapter(trained, fsdp):
        from_main(accelerator, write)
    return final


def save_best_adapter(output_dir: Path, cfg: RunConfig, model: torch.nn.Module, step: int, eval_loss: float) -> Path:
    """Write ``output_dir/best/`` (the adapter and ``best_eval.json``) atomically: into a hidden folder, flushed,
    then swapped in, so ``best/`` is always one complete adapter. The main process calls it."""
    final, tmp, old = output_dir / BEST_DIR, output_dir / f".{BEST_DIR}.tmp", output_dir / f".{BEST_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_adapter(model, tmp, cfg.lora, cfg.base_model)
        (tmp / BEST_FILE).write_text(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():  # put the previous best back
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path, bool]]:
    """[(step, path, complete)] sorted by step."""
    root = output_dir / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p, (p / COMPLETE).exists()))
    return sorted(found)


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    complete = [p for _, p, ok in list_checkpoints(output_dir) if ok]
    for p in complete[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in (output_dir / CHECKPOINTS_DIR).glob(".step-*"):  # temp folders of crashed saves
        shutil.rmtree(p, ignore_errors=True)


def checkpoint_problem(path: Path) -> str | None:
    """What makes a checkpoint folder unreadable, as a verb phrase ("is missing optimizer.pt"), or None. Cheap: reads
    the JSON state, the safetensors header and each torch file's zip directory, not the tensors. A torch file
    is checked before ``torch.load`` sees it, which aborts the whole process on some damaged files."""
    import zipfile

    from safetensors import safe_open

    for name in (STATE_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_FILE, SCHEDULER_FILE):
        if not (path / name).is_file():
            return f"is missing {name}"
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict):
            return f"has a {STATE_FILE} that is not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"has an unreadable {STATE_FILE} ({e})"
    try:
        with safe_open(path / ADAPTER_WEIGHTS, framework="pt") as f:
            list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        return f"has an unreadable adapter_model.safetensors ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    for name in [OPTIMIZER_FILE, SCHEDULER_FILE, *sorted(p.name for p in path.glob("rng_state*.pt"))]:
        try:
            with zipfile.ZipFile(path / name) as z:
                if not z.namelist():
                    return f"has an empty {name}"
        except (OSError, zipfile.BadZipFile) as e:
            return f"has a damaged or truncated {name} ({e})"
    return None


def find_checkpoint(output_dir: Path, spec: str, warn: Any = print) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the newest complete one whose files read (None if there is
    none; each one skipped is reported through ``warn``). A named checkpoint must read, or ``ConfigError``."""
    if spec != "auto":
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ConfigError(f"resume_from_checkpoint: checkpoint folder not found: {spec}")
        if not (path / COMPLETE).exists():
            raise ConfigError(f"resume_from_checkpoint: {spec} is incomplete (no {COMPLETE} marker)")
        problem = checkpoint_problem(path)
        if problem:
            raise ConfigError(f"resume_from_checkpoint: checkpoint {spec} {problem}")
        return path
    for step, path, complete in reversed(list_checkpoints(output_dir)):
        if not complete:
            warn(f"skipping incomplete checkpoint {path} (step {step})")
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path} (step {step}): it {problem}; trying the one before")
    return None


def _load_file(path: Path, load: Any) -> Any:
    """``load(path)``; any failure is one ``ModelError`` naming the file."""
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - pickle/zip/json errors of a damaged file are all the same to a user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            f"checkpoint file {path} cannot be read ({reason}); resume from an earlier checkpoint"
        ) from None


@dataclass
class Checkpoint:
    """A checkpoint as read by the main process, sent whole to every process (``sharding.from_main``)."""

    path: Path
    state: TrainerState
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]  # one per process, by rank


def read_checkpoint(path: Path, cfg: RunConfig, processes: int = 1) -> Checkpoint:
    """Read every file of the checkpoint at ``path``; refuse a changed config or another number of processes."""
    from qlora_cli.model.adapter_io import read_adapter

    for name in (STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, rng_file(0)):
        if not (path / name).exists():
            raise ModelError(f"checkpoint {path} is missing {name}")
    state = _load_file(path / STATE_FILE, lambda p: TrainerState(**json.loads(p.read_text())))
    digest, current = config_fingerprint(cfg)
    changed = sorted(k for k in set(current) | set(state.config) if current.get(k) != state.config.get(k))
    changed = [k for k in changed if k in state.config or not _is_default(k, current[k])]  # keys added since
    if digest != state.config_hash and changed:
        raise ConfigError(
            f"cannot resume from {path}: the config changed ({', '.join(changed)}); only "
            f"{', '.join(sorted(RESUMABLE_KEYS - {'resume_from_checkpoint'}))} may change on resume"
        )
    if state.processes and state.processes != processes:
        raise ConfigError(
            f"cannot resume from {path}: {state.processes} process{'es' if state.processes > 1 else ''} wrote it "
            f"and this run has {processes}; resume it with {state.processes} in all (each one's data order and "
            "random state are in the checkpoint)"
        )
    for rank in range(processes):
        if not (path / rng_file(rank)).exists():
            raise ModelError(
                f"checkpoint {path} has no RNG state for process {rank}; resume with the same number of processes"
            )
    _, adapter = _load_file(path, read_adapter)
    optimizer = _load_file(path / OPTIMIZER_FILE, lambda p: torch.load(p, weights_only=True, map_location="cpu"))
    scheduler = _load_file(path / SCHEDULER_FILE, lambda p: torch.load(p, weights_only=True))
    rng = [_load_file(path / rng_file(r), lambda p: torch.load(p, weights_only=True)) for r in range(processes)]
    return Checkpoint(path, state, adapter, optimizer, scheduler, rng)


def restore_adapter(checkpoint: Checkpoint, cfg: RunConfig, model: torch.nn.Module) -> None:
    """Put the checkpoint's adapter (LoRA, DoRA magnitudes, PiSSA/OLoRA offsets, trained rows and copies) into the
    unwrapped model, before DDP or FSDP wraps it."""
    from qlora_cli.model.adapter_io import (
        adapter_magnitudes,
        adapter_modules,
        check_fit,
        copy_weights,
        saved_settings,
        split_offsets,
    )
    from qlora_cli.model.lora import lora_layers
    from qlora_cli.model.token_rows import copy_rows

    path, tensors = checkpoint.path, checkpoint.adapter
    layers = dict(lora_layers(model))
    saved = adapter_modules(tensors, f"checkpoint {path}")
    lora_rank = saved_settings(cfg.lora).r  # a PiSSA / OLoRA start is saved in PEFT's converted form, rank 2r
    check_fit(saved, lora_rank, layers, lambda: layers, f"checkpoint {path}", "does not fit this model")
    if cfg.lora.offset_start:
        saved, offsets = split_offsets(saved, cfg.lora_r)
        for name, (lora_A, lora_B) in offsets.items():
            device = layers[name].lora_A.weight.device
            layers[name].offset = (lora_A.to(device, torch.float32), lora_B.to(device, torch.float32))
    copy_weights(layers, saved, adapter_magnitudes(tensors), cfg.use_dora, f"checkpoint {path}")
    copy_rows(model, tensors, f"checkpoint {path}")


def restore_training(
    checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0, fsdp: bool = False
) -> TrainerState:
    """Put the optimizer (under FSDP cut into this process's shards), schedule and this process's RNG back; the
    trainer state (step, data position, log window) is returned."""
    path = checkpoint.path
    state = shard_optimizer_state(checkpoint.optimizer, optimizer) if fsdp else checkpoint.optimizer
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, IndexError) as e:
        raise ModelError(f"checkpoint file {path / OPTIMIZER_FILE} does not fit this optimizer ({e})") from None
    try:
        scheduler.load_state_dict(checkpoint.scheduler)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ModelError(f"checkpoint file {path / SCHEDULER_FILE} does not fit this schedule ({e})") from None
    _restore_rng(checkpoint.state, checkpoint.rng[rank])
    return checkpoint.state
