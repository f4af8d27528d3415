"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's tracking API.

    report_to: [tensorboard, wandb]     accelerate's trackers, started by ``Accelerator.init_trackers``;
    run_name: my-run                    every record ``metrics.jsonl`` gets goes to ``Accelerator.log``

Only the main process reports (accelerate's ``init_trackers`` and ``log`` run there only). Each tracker's
package is imported by accelerate when the run starts; ``check_trackers`` refuses a missing one before
anything is loaded or written.

    wandb_project: my-project           W&B's project (else $WANDB_PROJECT, else qlora) and entity (else
    wandb_entity: my-team               $WANDB_ENTITY, else W&B's default); WANDB_MODE=offline keeps it local

Resume continues the same curves, no step twice: TensorBoard purges the events after the checkpoint's step
(``SummaryWriter(purge_step=)``), W&B resumes the run by its id and MLflow by its run id (both kept in
``output_dir/trackers.json``). Neither W&B nor MLflow can take a step back, so the steps they already hold
(MLflow: its store says; W&B: the last step the earlier run logged, or the resumed run's starting step
online) are not sent again: they keep the earlier run's values where the resumed run trains steps again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Any

from qlora_cli.config import RunConfig
from qlora_cli.errors import ConfigError
from qlora_cli.layout import TENSORBOARD_DIR, TRACKERS_FILE

PROJECT = "qlora"  # W&B project / MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # report_to name -> pip package
# preference tuning's logged numbers (train.preference.Sums.means), under the same names in the trackers
PREFERENCE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "nll",
    "log_odds_ratio",
    "kl",
)
# metrics.jsonl key -> tracker metric name, per record type
METRIC_NAMES = {
    "train": {
        "loss": "train/loss",
        "lr": "train/learning_rate",
        "grad_norm": "train/grad_norm",
        "tokens_per_sec": "train/tokens_per_sec",
        "epoch": "train/epoch",
        **{k: f"train/{k}" for k in PREFERENCE_METRICS},
    },
    "eval": {
        "eval_loss": "eval/loss",
        "eval_ppl": "eval/perplexity",
        **{f"eval_{k}": f"eval/{k}" for k in PREFERENCE_METRICS},
    },
}


def check_trackers(names: list[str]) -> None:
    """``ConfigError`` naming the pip package of the first tracker that is not installed."""
    for name in names:
        package = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"report_to: {name} needs the {package} package; pip install {package}")


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config, flat: numbers, strings and booleans as they are, anything else as JSON text
    (TensorBoard's hparams take scalars only; None becomes "null")."""
    out: dict[str, Any] = {}
    for key, value in cfg.model_dump(mode="json").items():
        out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, under the trackers' names ({} for summaries and errors)."""
    names = METRIC_NAMES.get(record.get("type", ""), {})
    return {name: float(record[key]) for key, name in names.items() if isinstance(record.get(key), (int, float))}


class Reporter:
    """Sends metrics.jsonl's records to the started trackers; ``skip_through`` holds, per tracker, the last
    step it already has (MLflow on resume), so no step is sent twice."""

    def __init__(self, accelerator: Any, skip_through: dict[str, int] | None = None):
        self.accelerator = accelerator
        self.skip_through = skip_through or {}

    def report(self, record: dict[str, Any]) -> None:
        values, step = tracker_values(record), record.get("step")
        if not values or not isinstance(step, int):
            return
        if not self.skip_through:
            self.accelerator.log(values, step=step)
            return
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                if step > self.skip_through.get(tracker.name, -1):
                    tracker.log(values, step=step)

    def finish(self) -> None:
        """Close every tracker (flush TensorBoard's events, end the W&B and MLflow runs)."""
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.accelerator.trackers = []


def start_trackers(
    accelerator: Any, cfg: RunConfig, out: Path, resumed_step: int | None, logged_through: int | None = None
) -> Reporter | None:
    """Build and start the trackers ``cfg.report_to`` names (main process); None when there are none.
    ``resumed_step``: the checkpoint's step when the run resumes; ``logged_through``: then the last step the
    earlier run logged to metrics.jsonl. A new run stores the config as hyperparameters."""
    if not cfg.report_to:
        return None
    ids_file = out / TRACKERS_FILE
    ids: dict[str, str] = {}
    if resumed_step is not None and ids_file.exists():
        try:
            ids = json.loads(ids_file.read_text())
        except (OSError, ValueError):
            ids = {}
    trackers: list[Any] = []
    try:
        skip = _start(accelerator, cfg, out, resumed_step, logged_through, ids, trackers)
    except Exception as e:
        if not _from_tracker(e):
            raise  # a bug in qlora keeps its traceback
        for tracker in trackers:
            try:
                tracker.finish()  # the ones that did start (W&B's run, TensorBoard's writer)
            except Exception:  # one that did not start has nothing to finish
                pass
        accelerator.trackers = []
        kind = f"{type(e).__module__}.{type(e).__qualname__}"
        lines = str(e).strip().splitlines()
        raise ConfigError(f"report_to: a tracker did not start: {kind}: {lines[0] if lines else ''}") from e
    if accelerator.is_main_process:
        ids_file.write_text(json.dumps(ids) + "\n")
    return Reporter(accelerator, skip)


def _from_tracker(e: Exception) -> bool:
    """An exception of a tracker's own package, or of what it reaches (files, network, a module it needs):
    the tracker refused to start with the user's setup (its store, login or network), not a bug in qlora."""
    package = type(e).__module__.split(".")[0]
    return package in ("wandb", "mlflow", "tensorboard", "requests", "urllib3") or isinstance(e, (OSError, ImportError))


def _start(
    accelerator: Any,
    cfg: RunConfig,
    out: Path,
    resumed_step: int | None,
    logged_through: int | None,
    ids: dict[str, str],
    trackers: list[Any],
) -> dict[str, int]:
    """Build the trackers into ``trackers``, start them, fill ``ids``; the steps each already holds (resume)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    run_name = cfg.run_name or out.resolve().name
    if "tensorboard" in cfg.report_to:
        # purge_step: TensorBoard hides the events a crashed run wrote after its last checkpoint
        kwargs = {"purge_step": resumed_step + 1} if resumed_step is not None else {}
        trackers.append(TensorBoardTracker(TENSORBOARD_DIR, out, **kwargs))
    wandb_logged = logged_through if "wandb_id" in ids else None  # the earlier run reported to W&B too
    if "wandb" in cfg.report_to:
        ids.setdefault("wandb_id", secrets.token_hex(8))
        project = cfg.wandb_project or os.environ.get("WANDB_PROJECT") or PROJECT
        entity = {"entity": cfg.wandb_entity} if cfg.wandb_entity else {}  # else wandb reads $WANDB_ENTITY
        trackers.append(
            WandBTracker(project, name=run_name, id=ids["wandb_id"], resume="allow", dir=str(out), **entity)
        )
    if "mlflow" in cfg.report_to:
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        trackers.append(MLflowTracker(experiment_name=experiment, run_id=ids.get("mlflow_run_id"), run_name=run_name))
    accelerator.log_with = trackers  # accelerate starts tracker objects given to it as they are
    accelerator.init_trackers(PROJECT, config=hyperparameters(cfg) if resumed_step is None else None)
    skip: dict[str, int] = {}
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "mlflow":
                ids["mlflow_run_id"] = tracker.active_run.info.run_id
                if resumed_step is not None:
                    skip["mlflow"] = _mlflow_last_step(ids["mlflow_run_id"])
            if tracker.name == "wandb" and resumed_step is not None:
                # offline, W&B cannot say what the run holds (starting_step 0): metrics.jsonl's earlier run does
                held = max(wandb_logged or -1, getattr(tracker.run, "starting_step", 0) - 1)
                if held > resumed_step:
                    skip["wandb"] = held
    return skip


def _mlflow_last_step(run_id: str) -> int:
    """The last step the MLflow run holds for any of qlora's metrics (-1 when none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    last = -1
    for name in (n for names in METRIC_NAMES.values() for n in names.values()):
        for m in client.get_metric_history(run_id, name):
            last = max(last, m.step)
    return last
