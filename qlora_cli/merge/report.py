"""What a merge did: per-layer statistics, the self-check's result, the printed report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from qlora_cli.merge.self_check import CHECK_LIMITS, TOP1_MARGIN, CheckResult


@dataclass
class LayerStat:
    module: str
    delta_rel: float  # ‖ΔW‖ / ‖W‖ (W: the base weight the delta was added to)
    quant_err_rel: float | None  # ‖W − dequant(NF4(W))‖ / ‖ΔW‖, for layers the run held in 4 bits


@dataclass
class MergeResult:
    output: Path
    dtype: str
    base_weights: str
    n_tensors: int
    n_merged: int
    shards: int
    bytes_written: int
    seconds: float
    layers: list[LayerStat]
    check: CheckResult | None
    check_skipped: str | None = None


# ---------------------------------------------------------------------------------------------
# report


def layer_groups(layers: list[LayerStat]) -> dict[str, list[LayerStat]]:
    """Per-layer statistics grouped by module kind (the last name component: q_proj, c_attn, ...)."""
    groups: dict[str, list[LayerStat]] = {}
    for s in layers:
        groups.setdefault(s.module.rsplit(".", 1)[-1], []).append(s)
    return groups


def print_report(console: Console, result: MergeResult) -> None:
    from rich.table import Table

    with_quant = any(s.quant_err_rel is not None for s in result.layers)
    table = Table(title=f"merged layers ({result.base_weights} base weights)", title_justify="left")
    table.add_column("module")
    table.add_column("layers", justify="right")
    table.add_column("‖ΔW‖/‖W‖ mean", justify="right")
    table.add_column("max", justify="right")
    if with_quant:
        table.add_column("NF4 error / ‖ΔW‖ median", justify="right")
        table.add_column("layers where NF4 error > ‖ΔW‖", justify="right")
    for kind, stats in layer_groups(result.layers).items():
        rel = [s.delta_rel for s in stats]
        row = [kind, str(len(stats)), f"{sum(rel) / len(rel):.2e}", f"{max(rel):.2e}"]
        if with_quant:
            q = sorted(s.quant_err_rel for s in stats if s.quant_err_rel is not None)
            row += [f"{q[len(q) // 2]:.2f}×" if q else "-", str(sum(x > 1 for x in q))]
        table.add_row(*row)
    console.print(table)
    dominated = [s for s in result.layers if s.quant_err_rel is not None and s.quant_err_rel > 1]
    if result.base_weights == "original" and dominated:
        console.print(
            f"[yellow]warning[/yellow]: in {len(dominated)}/{len(result.layers)} layers the NF4 quantization error "
            "is larger than the learned delta: the adapter learned to work with the 4-bit weights, and merging it "
            "into the original ones undoes part of what it learned (--base-weights dequantized merges into those)"
        )
    check = result.check
    if check is None:
        if result.check_skipped:
            console.print(f"[yellow]self-check skipped[/yellow]: {result.check_skipped} (--no-verify silences this)")
        return
    t = Table(title=f"self-check: merged model vs {check.reference}", title_justify="left")
    t.add_column("")
    t.add_column("merged", justify="right")
    t.add_column("base without adapter", justify="right")
    t.add_column("limit", justify="right")
    lim = CHECK_LIMITS[check.limits]
    t.add_row("mean KL (nats/token)", f"{check.mean_kl:.3g}", f"{check.adapter_kl:.3g}", f"≤ {lim.max_kl:g}")
    t.add_row("top-1 agreement", f"{check.top1_agreement:.1%}", f"{check.adapter_top1:.1%}", "")
    t.add_row(
        f"  where the adapter leads by ≥ {TOP1_MARGIN:g}",
        f"{check.top1_decisive:.1%}",
        "",
        f"≥ {lim.min_top1:.0%}",
    )
    t.add_row("max |Δlogit|", f"{check.max_abs_logit_diff:.3g}", "", "")
    console.print(t)
    console.print(
        f"{check.n_prompts} prompts from {check.prompts_from}, {check.n_positions} positions; {check.limits} limits, "
        f"and mean KL ≤ {lim.max_effect_fraction:.0%} of the adapter's own effect when that is ≥ {lim.min_effect:g}"
    )
    if check.training_kl is not None:
        console.print(
            f"distance to the training-time model (every linear layer in NF4, as trained): mean KL "
            f"{check.training_kl:.3g}; quantization error in layers the merge leaves at their base weights"
        )
    if check.passed:
        console.print("[green]self-check passed[/green]: the merged model reproduces the adapter")
    else:
        console.print(
            f"[bold red]self-check FAILED[/bold red]: {'; '.join(check.problems)}. The merged model in "
            f"{result.output} does not reproduce the adapter; do not deploy it."
        )
