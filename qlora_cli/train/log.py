"""What ``qlora train`` reports while it runs: the start summary, the progress bar (or plain lines off a
terminal), ``metrics.jsonl`` and the SIGINT/SIGTERM flag the loop checks between steps."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qlora_cli.config import RunConfig
from qlora_cli.data.pipeline import Example, TrainData
from qlora_cli.run_folder import read_metrics


class MetricsLog:
    """metrics.jsonl, appended line by line. On resume, records after the checkpoint's step are dropped,
    so the log of a resumed run equals the log of an uninterrupted one."""

    def __init__(self, path: Path, keep_through_step: int | None, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.report: Any = None  # also send each record to the experiment trackers
        self.logged_through: int | None = None  # on resume: the last step the earlier run logged (dropped or not)
        kept = []
        if keep_through_step is not None:
            for record in read_metrics(path):
                if record["type"] not in ("train", "eval") or record.get("step") is None:
                    continue
                step = record["step"]
                self.logged_through = max(self.logged_through or 0, step)
                if step <= keep_through_step:
                    kept.append(record)
        self.history = kept
        if enabled:
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.report is not None:
            self.report(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class StopSignals:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and exits. A second SIGINT
    interrupts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal, self.name = signum, signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def report_start(
    console: Console,
    cfg: RunConfig,
    data: TrainData,
    model: Any,
    target_names: list[str],
    params: list[torch.nn.Parameter],
    steps: int,
    device: torch.device,
    world: int = 1,
    rows: list[list[Example]] | None = None,
) -> None:
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())  # 4-bit weights count packed (two per byte)
    s = data.train_stats
    console.print(
        f"[bold]qlora train[/bold] {cfg.base_model} on {device.type}"
        f" ({'4-bit ' + cfg.bnb_4bit_quant_type if cfg.load_in_4bit else '16-bit base'}, compute {cfg.bnb_4bit_compute_dtype})"
    )
    console.print(
        f"{'DoRA' if cfg.use_dora else 'LoRA'} r={cfg.lora_r} alpha={cfg.lora_alpha:g}"
        f"{'' if cfg.init_lora_weights == 'default' else f', {cfg.init_lora_weights} start'} on {len(target_names)} modules; "
        f"trainable {trainable:,} params ({100 * trainable / max(total, 1):.3f}% of stored)"
    )
    if not cfg.streaming:  # a stream's counts are not known up front (setup prints its own line)
        console.print(
            f"data: {s.examples} train examples, {s.tokens:,} tokens ({s.target_tokens:,} targets), "
            f"{len(data.eval)} eval; truncated {s.truncated}, dropped {s.dropped}"
        )
    if cfg.sample_packing and rows is not None:
        used = sum(len(e.input_ids) for row in rows for e in row)
        console.print(
            f"sample packing: {s.examples} examples in {len(rows)} rows of {cfg.sequence_len}, "
            f"efficiency {used / max(len(rows) * cfg.sequence_len, 1):.1%}"
        )
    unit = "rows" if cfg.sample_packing else "examples"
    effective = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world
    console.print(
        f"{steps} steps, effective batch {effective} {unit} ({cfg.micro_batch_size} x {cfg.gradient_accumulation_steps} "
        f"accumulation x {world} process{'es' if world > 1 else ''}), lr {cfg.learning_rate:g} {cfg.lr_scheduler}, "
        f"{cfg.optimizer}"
    )


class ProgressDisplay:
    """A rich progress bar on a terminal; plain log lines otherwise (CI logs, pipes)."""

    def __init__(self, console: Console, total: int, completed: int = 0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total, info="", completed=completed)

    def __enter__(self) -> ProgressDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if record is not None:
            info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_sec']:,.0f} tok/s"
            self.progress.update(self.task, completed=step, info=info)
            if not self.live:
                self.console.print(
                    f"step {step}/{self.progress.tasks[0].total}  {info}  grad_norm {record['grad_norm']:.3f}"
                )
        else:
            self.progress.update(self.task, completed=step)
