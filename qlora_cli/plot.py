"""``qlora plot``: training curves from run folders' ``metrics.jsonl``, several runs overlaid.

    +----------------------------+----------------------------+
    | train loss (raw, smoothed) | eval loss                  |
    +----------------------------+----------------------------+
    | learning rate              | gradient norm              |
    +----------------------------+----------------------------+
    | reward margin              | reward accuracy            |   preference tuning only (train and eval)
    +----------------------------+----------------------------+

matplotlib is imported only here, only when drawing, through its object API (no pyplot, no global state,
no display needed); it is an optional dependency (``pip install 'qlora-cli[plot]'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_cli.errors import ConfigError
from qlora_cli.layout import METRICS_FILE, PLOT_FILE
from qlora_cli.run_folder import finite, read_metrics

SMOOTHING = 0.6  # TensorBoard's default: each point is 0.6 * the previous smoothed value + 0.4 * this one
FIGSIZE, DPI = (12, 8), 100  # a 1200 x 800 pixel image
PLOTTABLE = 1e100  # larger magnitudes (a log edited by hand, 1e308) overflow the axes' range arithmetic
MATPLOTLIB_MISSING = "qlora plot needs matplotlib: pip install matplotlib (or pip install 'qlora-cli[plot]')"


class PlottingUnavailable(ConfigError):
    """matplotlib is not installed."""


@dataclass
class Curves:
    """One run's series, each a list of (step, value) sorted by step, one value per step."""

    name: str
    loss: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    grad_norm: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    # preference tuning: rewards/margin and rewards/accuracy of the train and eval records
    margin: list[tuple[int, float]] = field(default_factory=list)
    accuracy: list[tuple[int, float]] = field(default_factory=list)
    eval_margin: list[tuple[int, float]] = field(default_factory=list)
    eval_accuracy: list[tuple[int, float]] = field(default_factory=list)


def read_curves(run_dir: str | Path, name: str | None = None) -> Curves:
    """The run's curves. A step logged twice (a run resumed from an older checkpoint by hand, a log copied
    over) keeps its last value, so a resumed run is one line. Raises ``ConfigError`` for a folder without
    ``metrics.jsonl``."""
    folder = Path(run_dir).expanduser()
    if not (folder / METRICS_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {METRICS_FILE} (is it a run folder written by qlora train?)")
    series: dict[str, dict[int, float]] = {k: {} for k in SERIES}
    for r in read_metrics(folder):
        step = r.get("step")
        if not isinstance(step, int):
            continue
        if r.get("type") not in ("train", "eval"):
            continue
        for key, logged in SERIES.items():
            if key.startswith("eval_") != (r.get("type") == "eval"):
                continue
            value = r.get(logged)
            if finite(value) and abs(value) <= PLOTTABLE:
                series[key][step] = float(value)
    curves = Curves(name or folder.resolve().name)
    for key, points in series.items():
        setattr(curves, key, sorted(points.items()))
    return curves


# Curves field -> metrics.jsonl key (fields starting with eval_ read eval records, the others train records)
SERIES = {
    "loss": "loss",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "eval_loss": "eval_loss",
    "margin": "rewards/margin",
    "accuracy": "rewards/accuracy",
    "eval_margin": "eval_rewards/margin",
    "eval_accuracy": "eval_rewards/accuracy",
}


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased as TensorBoard does (the first points are not pulled to 0)."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def make_figure(runs: list[Curves]) -> Any:
    """A matplotlib ``Figure`` with the four panels, one colour per run, and a legend of run names."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlottingUnavailable(MATPLOTLIB_MISSING) from None

    rewards = any(run.margin or run.eval_margin for run in runs)
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 1.5) if rewards else FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if rewards else 2, 2, sharex=True)
    (ax_loss, ax_eval), (ax_lr, ax_grad) = axes[0], axes[1]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        if run.loss:
            steps, values = zip(*run.loss)
            ax_loss.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
            ax_loss.plot(steps, smooth(list(values)), color=colour, linewidth=2, label=run.name)
        if run.eval_loss:
            steps, values = zip(*run.eval_loss)
            ax_eval.plot(steps, values, color=colour, marker="o", markersize=4, label=run.name)
        if run.lr:
            ax_lr.plot(*zip(*run.lr), color=colour, label=run.name)
        if run.grad_norm:
            ax_grad.plot(*zip(*run.grad_norm), color=colour, alpha=0.8, label=run.name)
        if rewards:
            for ax, train, evals in (
                (axes[2][0], run.margin, run.eval_margin),
                (axes[2][1], run.accuracy, run.eval_accuracy),
            ):
                if train:
                    ax.plot(*zip(*train), color=colour, alpha=0.6, label=run.name)
                if evals:
                    ax.plot(*zip(*evals), color=colour, marker="o", markersize=4, linestyle="--")
    titles = {
        ax_loss: f"train loss (faint: raw, bold: smoothed {SMOOTHING})",
        ax_eval: "eval loss",
        ax_lr: "learning rate",
        ax_grad: "gradient norm (before clipping)",
    }
    if rewards:
        titles[axes[2][0]] = "reward margin (line: train, dashed: eval)"
        titles[axes[2][1]] = "reward accuracy (line: train, dashed: eval)"
    for ax, title in titles.items():
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    handles = [h for h in ax_loss.get_lines() if not h.get_label().startswith("_")]
    if not handles:  # no train loss: take the legend from the eval panel
        handles = [h for h in ax_eval.get_lines() if not h.get_label().startswith("_")]
    if handles:
        ax_loss.legend(handles=handles, loc="upper right")
    return fig


def run_plot(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Draw ``run_dirs`` into one PNG at ``output`` (written atomically). Raises ``ConfigError``."""
    import os
    import tempfile

    if not run_dirs:
        raise ConfigError("give at least one run folder")
    names = [Path(r).expanduser().resolve().name for r in run_dirs]
    runs = [
        read_curves(r, str(r) if names.count(n) > 1 else n) for r, n in zip(run_dirs, names)
    ]  # the path as given where two runs share a folder name
    if not any(c.loss or c.eval_loss for c in runs):
        raise ConfigError(f"nothing to plot: no train or eval loss in {', '.join(str(r) for r in run_dirs)}")
    out = Path(output).expanduser()
    if out.is_dir():
        raise ConfigError(f"-o {output} is a folder; give a .png file path")
    if not out.parent.is_dir():
        raise ConfigError(f"-o {output}: folder {out.parent} does not exist")
    fig = make_figure(runs)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def default_output(run_dirs: list[str | Path]) -> Path:
    """One run: its own ``loss.png``; several: ``curves.png`` in the current folder."""
    return Path(run_dirs[0]) / PLOT_FILE if len(run_dirs) == 1 else Path("curves.png")


def write_loss_plot(run_dir: Path, console: Any) -> Path | None:
    """``train``'s ``loss.png``; without matplotlib, one line saying so and nothing written."""
    try:
        return run_plot([run_dir], run_dir / PLOT_FILE)
    except PlottingUnavailable:
        console.print(f"no {PLOT_FILE}: matplotlib is not installed (pip install matplotlib)")
    except ConfigError:  # nothing logged yet (a run shorter than logging_steps without eval)
        pass
    return None
