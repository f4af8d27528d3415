"""``qlora inspect RUN_FOLDER``: an adapter's rank, scaling, size, per-module ||scaling * B @ A||, the training
summary from metrics.jsonl, and whether vLLM can serve it (``vllm_check``)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from qlora_cli.config import load_config
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.layout import MODEL_CONFIG
from qlora_cli.memory_plan.sizes import (
    format_bytes,
)
from qlora_cli.model.adapter_io import VLLM_MAX_LORA_RANKS

# Modules vLLM serves LoRA on only with extra flags or not at all: qlora's adapters never target them.
VLLM_SPECIAL_MODULES = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out", "embed_in")

# ---------------------------------------------------------------------------------------------
# adapter report


def adapter_report(path: str | Path) -> dict[str, Any]:
    """Rank, scaling, size, per-module delta norms, training summary and the vLLM serving check of a run or
    adapter folder."""
    from qlora_cli.config import lora_scaling
    from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE, METRICS_FILE
    from qlora_cli.model.adapter_io import (
        PEFT_PREFIX,
        adapter_modules,
        from_peft_key,
        read_adapter_config,
        read_adapter_weights,
    )

    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"run folder not found: {path}")
    if not folder.is_dir():
        raise ModelError(f"expected a run or adapter folder, got a file: {path}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).exists():
            raise ModelError(f"{path} is not an adapter folder: {name} is missing")
    config = read_adapter_config(folder, required=("r", "lora_alpha"))
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = lora_scaling(r, alpha, bool(config.get("use_rslora", False)))
    weights_file = folder / ADAPTER_WEIGHTS
    tensors = read_adapter_weights(weights_file)
    raw_keys = list(tensors)
    ours = {from_peft_key(k): t for k, t in tensors.items() if k.startswith(PEFT_PREFIX)}
    modules = adapter_modules(ours, str(weights_file), strict=False)  # other tensors: a vllm_check problem
    norms = [{"module": name, "delta_norm": delta_norm(a, b, scaling)} for name, (a, b) in modules.items()]
    run_config = None
    if (folder / CONFIG_FILE).exists():
        try:
            run_config = load_config(folder / CONFIG_FILE)
        except ConfigError as e:
            raise ModelError(f"run folder {path}: {e}") from None
    base = run_config.base_model if run_config else config.get("base_model_name_or_path")
    architecture = _architecture(base)
    return {
        "kind": "adapter",
        "path": str(folder),
        "base_model": base,
        "architecture": architecture,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": bool(config.get("use_rslora", False)),
        "adapter_kind": ("DoRA" if config.get("use_dora") else "LoRA")
        + (" + trained token rows" if config.get("trainable_token_indices") else "")
        + (f" + whole {', '.join(config['modules_to_save'])}" if config.get("modules_to_save") else ""),
        "scaling": scaling,
        "target_modules": config.get("target_modules"),
        "modules": len(modules),
        "params": sum(t.numel() for t in tensors.values()),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "file_bytes": weights_file.stat().st_size,
        "dtype": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "delta_norms": norms,
        "training": training_summary(folder / METRICS_FILE),
        "serving": vllm_check(config, raw_keys, base, folder, architecture),
    }


def delta_norm(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> float:
    """||scaling * B @ A||_F without forming the (out, in) product: ||BA||^2 = sum((B^T B) * (A A^T)), r x r."""
    a, b = lora_A.double(), lora_B.double()
    gram = (b.T @ b) * (a @ a.T)  # (r, r)
    return abs(scaling) * math.sqrt(max(float(gram.sum()), 0.0))


def _architecture(base: str | None) -> str | None:
    if not base:
        return None
    config = Path(base).expanduser() / MODEL_CONFIG
    if not config.is_file():
        return None
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return None
    return archs[0] if archs else None


def training_summary(metrics_path: Path) -> dict[str, Any] | None:
    """Steps, losses, tokens and wall time from a run's metrics.jsonl (None for a bare adapter)."""
    from qlora_cli.run_folder import read_metrics

    if not metrics_path.exists():
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("eval_loss") is not None]
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), None)
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
    return {
        "finished": summary is not None,
        "steps": summary["steps"] if summary else (train[-1]["step"] if train else 0),
        "final_train_loss": summary.get("train_loss") if summary else (train[-1]["loss"] if train else None),
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": best["eval_loss"] if best else None,
        "best_eval_step": best["step"] if best else None,
        "train_examples": summary.get("train_examples") if summary else None,
        "train_target_tokens": summary.get("train_target_tokens") if summary else None,
        "wall_time_sec": summary.get("elapsed_sec") if summary else (train[-1].get("elapsed_sec") if train else None),
    }


# Architectures for which vLLM implements LoRA (SupportsLoRA) among those qlora trains; others may work.
VLLM_LORA_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GemmaForCausalLM",
    "Phi3ForCausalLM",
    "GPTNeoXForCausalLM",
    "OPTForCausalLM",
}


def vllm_check(
    config: dict[str, Any], keys: list[str], base: str | None, folder: Path, architecture: str | None = None
) -> dict[str, Any]:
    """Whether vLLM's ``--enable-lora`` loads this adapter, and the command line that serves it.

    Checked: PEFT LoRA (peft_type LORA); rank <= a value vLLM accepts for --max-lora-rank; no DoRA; no
    modules_to_save; bias "none"; no per-module rank/alpha patterns; tensor keys
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``; targets are linear layers of the decoder
    blocks (not the embeddings or the output head); not a transposed Conv1D (GPT-2) adapter. The
    architecture is compared with a list of ones vLLM serves LoRA for (a warning, not a failure)."""
    problems: list[str] = []
    warnings: list[str] = []
    r = int(config.get("r", 0))
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, vLLM loads LORA adapters")
    fitting = [v for v in VLLM_MAX_LORA_RANKS if v >= r]
    max_rank = fitting[0] if fitting else None
    if max_rank is None:
        problems.append(f"rank {r} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    if config.get("use_dora"):
        problems.append("DoRA adapters (use_dora) are not supported by vLLM")
    if config.get("trainable_token_indices"):
        problems.append("trained token rows (trainable_token_indices) are not supported by vLLM")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (fully trained modules) are not supported")
    if config.get("bias", "none") not in ("none", None):
        problems.append(f"bias={config['bias']!r}: vLLM expects LoRA without bias weights")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module rank_pattern/alpha_pattern is not supported")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out (GPT-2 Conv1D) adapters are not supported by vLLM")
    bad_keys = [k for k in keys if not re.match(r"^base_model\.model\..+\.lora_[AB]\.weight$", k)]
    if bad_keys:
        problems.append(f"tensor {bad_keys[0]!r} is not a PEFT LoRA key (base_model.model.<module>.lora_A.weight)")
    module_names = {k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in keys if ".lora_" in k}
    special = sorted({n.rsplit(".", 1)[-1] for n in module_names if n.rsplit(".", 1)[-1] in VLLM_SPECIAL_MODULES})
    if special:
        problems.append(f"targets {', '.join(special)} (embeddings / output head) need vLLM's extra LoRA vocab support")
    if architecture and architecture not in VLLM_LORA_ARCHITECTURES:
        warnings.append(f"{architecture} is not in the list of architectures qlora knows vLLM serves LoRA for")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", folder.name) or "adapter"
    command = None
    if not problems and base:
        command = f"vllm serve {base} --enable-lora --lora-modules {name}={folder} --max-lora-rank {max_rank}"
    return {
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "max_lora_rank": max_rank,
        "command": command,
    }


def render_adapter(report: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{report['path']}[/bold]  adapter for {report['base_model']}")
    targets = report["target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else str(targets)
    console.print(
        f"  r={report['r']} alpha={report['lora_alpha']:g}{' (rsLoRA)' if report['use_rslora'] else ''}{' DoRA' if report['adapter_kind'] == 'DoRA' else ''} "
        f"scaling {report['scaling']:.4g}; targets {targets}; {report['modules']} modules"
    )
    console.print(
        f"  {report['params']:,} params, {format_bytes(report['file_bytes'])} on disk ({', '.join(report['dtype'])})"
    )
    render_norms(report["delta_norms"], console)
    t = report["training"]
    if t is None:
        console.print("training: no metrics.jsonl (a bare adapter folder)")
    else:
        parts = [f"{t['steps']} steps" + ("" if t["finished"] else " (unfinished)")]
        if t["final_train_loss"] is not None:
            parts.append(f"final train loss {t['final_train_loss']:.4f}")
        if t["final_eval_loss"] is not None:
            parts.append(f"final eval loss {t['final_eval_loss']:.4f}")
            parts.append(f"best {t['best_eval_loss']:.4f} at step {t['best_eval_step']}")
        if t["train_target_tokens"] is not None:
            parts.append(f"{t['train_examples']:,} examples, {t['train_target_tokens']:,} target tokens per epoch")
        if t["wall_time_sec"] is not None:
            parts.append(f"{t['wall_time_sec']:.1f}s wall")
        console.print("training: " + ", ".join(parts))
    s = report["serving"]
    if s["ok"]:
        console.print(f"vLLM: [green]can serve it[/green] (--max-lora-rank {s['max_lora_rank']})")
        if s["command"]:
            console.print(f"  {s['command']}", highlight=False, soft_wrap=True)
    else:
        console.print("vLLM: [red]cannot serve it[/red]")
        for p in s["problems"]:
            console.print(f"  - {p}")
    for w in s["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")


def render_norms(norms: list[dict[str, Any]], console: Console) -> None:
    """||scaling * B @ A|| as a layer x module table when the names have layer indices, else a list."""
    grid: dict[str, dict[str, float]] = defaultdict(dict)
    columns: list[str] = []
    for n in norms:
        m = re.search(r"\.(\d+)\.(.+)$", n["module"])
        layer, col = (m.group(1), m.group(2).rsplit(".", 1)[-1]) if m else (n["module"], "norm")
        if col in grid[layer]:  # two modules with one suffix in a layer: keep their full names apart
            col = m.group(2) if m else col
        grid[layer][col] = n["delta_norm"]
        if col not in columns:
            columns.append(col)
    columns.sort(key=lambda c: (MODULE_ORDER.index(c) if c in MODULE_ORDER else len(MODULE_ORDER), c))
    table = Table(title="||scaling * B @ A|| per module", title_justify="left", show_edge=False)
    table.add_column("layer")
    for c in columns:
        table.add_column(c, justify="right", no_wrap=True)
    for layer in sorted(grid, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        table.add_row(layer, *(f"{grid[layer][c]:.3g}" if c in grid[layer] else "" for c in columns))
    console.print(table)


MODULE_ORDER = [
    "q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "o_proj", "out_proj", "dense",
    "gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "dense_h_to_4h", "down_proj", "fc2", "c_proj",
    "dense_4h_to_h",
]  # fmt: skip
