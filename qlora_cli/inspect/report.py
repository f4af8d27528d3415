"""``qlora inspect``: understand a config, a dataset or an adapter before spending GPU hours.

    qlora inspect config.yaml         the model (from its config, on the meta device), the LoRA targets, the
                                      memory plan for one GPU (memory_plan/) and the largest micro-batch
    qlora inspect data config.yaml    what training will see: counts, lengths, rendered examples with the
                                      trained-on tokens marked, and plain warnings
    qlora inspect runs/my-run         an adapter: rank, scaling, size, per-module ||scaling * B @ A||, the training
                                      summary from metrics.jsonl, and whether vLLM can serve it

Each report is a plain dict (``--json`` prints it) rendered with rich. Nothing here loads model weights.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qlora_cli.config import RunConfig, load_config, parse_size
from qlora_cli.errors import ConfigError, DataError
from qlora_cli.inspect.adapter import adapter_report, render_adapter
from qlora_cli.memory_plan import MemoryPlan, plan_memory
from qlora_cli.memory_plan.sizes import (
    TargetInfo,
    format_bytes,
    linear_dims,
    load_model_config,
    meta_model,
    target_infos,
    weight_bytes,
)

# ---------------------------------------------------------------------------------------------
# config report


def config_report(
    cfg: RunConfig, gpu_memory: int | None = None, device: str | None = None, processes: int = 1, fsdp: bool = False
) -> dict[str, Any]:
    """Model summary, LoRA target table and memory plan of ``cfg`` (per process of ``processes``); no weights are
    loaded."""
    model_config = load_model_config(cfg)
    model = meta_model(model_config, cfg)
    targets = target_infos(model, cfg)  # ModelError when a target matches nothing, as train would
    weights = weight_bytes(model, cfg)
    trainable = sum(cfg.lora_r * (t.in_features + t.out_features) for t in targets)
    plan = plan_memory(
        cfg, model_config, device_type=device, gpu_memory=gpu_memory, targets=targets, processes=processes, fsdp=fsdp
    )
    return {
        "kind": "config",
        "base_model": cfg.base_model,
        "model": _model_summary(model_config, model, weights.params_total, cfg),
        "lora": {
            "r": cfg.lora_r,
            "alpha": cfg.lora_alpha,
            "scaling": cfg.lora.scaling,
            "dropout": cfg.lora_dropout,
            "target_modules": cfg.lora_target_modules,
        },
        "targets": target_table(targets, cfg.lora_r),
        "left_out": left_out_table(model, targets),
        "trainable_params": trainable,
        "total_params": weights.params_total,
        "trainable_percent": 100.0 * trainable / max(weights.params_total, 1),
        "memory": plan.to_dict(),
    }


def _model_summary(model_config: Any, model: torch.nn.Module, params: int, cfg: RunConfig) -> dict[str, Any]:
    def first(*names: str) -> Any:
        for n in names:
            v = getattr(model_config, n, None)
            if v is not None:
                return v
        return None

    architectures = getattr(model_config, "architectures", None) or [type(model).__name__]
    files = sorted(Path(cfg.base_model).expanduser().glob("*.safetensors")) if Path(cfg.base_model).is_dir() else []
    dtype = first("dtype", "torch_dtype")
    return {
        "architecture": architectures[0],
        "model_type": getattr(model_config, "model_type", None),
        "layers": first("num_hidden_layers", "n_layer"),
        "hidden_size": first("hidden_size", "n_embd", "d_model"),
        "intermediate_size": first("intermediate_size", "ffn_dim", "n_inner"),
        "attention_heads": first("num_attention_heads", "n_head"),
        "kv_heads": first("num_key_value_heads"),
        "vocab_size": first("vocab_size"),
        "tied_embeddings": bool(getattr(model_config, "tie_word_embeddings", False)),
        "parameters": params,
        "checkpoint_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "checkpoint_bytes": sum(f.stat().st_size for f in files) if files else None,
    }


def target_table(targets: list[TargetInfo], r: int) -> list[dict[str, Any]]:
    """One row per module-name suffix: how many modules, their (in, out) shapes, adapter params."""
    rows: dict[str, dict[str, Any]] = {}
    for t in targets:
        row = rows.setdefault(t.suffix, {"suffix": t.suffix, "count": 0, "shapes": [], "adapter_params": 0})
        row["count"] += 1
        shape = [t.in_features, t.out_features]
        if shape not in row["shapes"]:
            row["shapes"].append(shape)
        row["adapter_params"] += r * (t.in_features + t.out_features)
    return list(rows.values())


def left_out_table(model: torch.nn.Module, targets: list[TargetInfo]) -> list[dict[str, Any]]:
    """Linear layers LoRA does not wrap, by suffix; the output head is listed as never targeted."""
    from qlora_cli.model.lora import linear_module_names, output_head

    chosen = {t.name for t in targets}
    rows: dict[str, dict[str, Any]] = {}
    for name in linear_module_names(model):
        if name in chosen:
            continue
        suffix = name.rsplit(".", 1)[-1]
        row = rows.setdefault(suffix, {"suffix": suffix, "count": 0, "shapes": [], "why": "not in lora_target_modules"})
        row["count"] += 1
        shape = list(linear_dims(model.get_submodule(name)))
        if shape not in row["shapes"]:
            row["shapes"].append(shape)
    head = output_head(model)
    if head is not None:
        name = next(n for n, m in model.named_modules() if m is head)
        try:
            shape = [list(linear_dims(head))]
        except TypeError:
            shape = []
        rows[name] = {"suffix": name, "count": 1, "shapes": shape, "why": "output head (never targeted)"}
    return list(rows.values())


def render_config(report: dict[str, Any], console: Console) -> None:
    m = report["model"]
    console.print(f"[bold]{report['base_model']}[/bold]  {m['architecture']}")
    facts = [
        f"{m['layers']} layers",
        f"hidden {m['hidden_size']}",
        f"intermediate {m['intermediate_size']}" if m["intermediate_size"] else None,
        f"heads {m['attention_heads']}" + (f" (kv {m['kv_heads']})" if m["kv_heads"] else ""),
        f"vocab {m['vocab_size']:,}",
        "tied embeddings" if m["tied_embeddings"] else None,
        f"{m['parameters'] / 1e9:.2f}B params" if m["parameters"] >= 1e8 else f"{m['parameters']:,} params",
    ]
    if m["checkpoint_bytes"]:
        facts.append(f"checkpoint {format_bytes(m['checkpoint_bytes'])} ({m['checkpoint_dtype']})")
    console.print("  " + ", ".join(f for f in facts if f))
    lora = report["lora"]
    console.print(
        f"LoRA r={lora['r']} alpha={lora['alpha']:g} (scaling {lora['scaling']:.4g}), dropout {lora['dropout']:g}: "
        f"trainable [bold]{report['trainable_params']:,}[/bold] of {report['total_params']:,} params "
        f"({report['trainable_percent']:.3f}%)"
    )
    table = Table(title="LoRA targets", title_justify="left", show_edge=False)
    for col in ("module", "count", "in -> out", "adapter params"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for row in report["targets"]:
        shapes = ", ".join(f"{i} -> {o}" for i, o in row["shapes"])
        table.add_row(row["suffix"], str(row["count"]), shapes, f"{row['adapter_params']:,}")
    console.print(table)
    if report["left_out"]:
        left = ", ".join(
            f"{r['suffix']} x{r['count']}" + (" (head)" if "head" in r["why"] else "") for r in report["left_out"]
        )
        console.print(f"linear layers left out: {left}")
    render_plan(report["memory"], console)


def render_plan(plan: dict[str, Any], console: Console) -> None:
    where = "one GPU" if plan["device"] == "cuda" else "CPU"
    if plan.get("processes", 1) > 1:
        where = f"each of {plan['processes']} {'GPUs' if plan['device'] == 'cuda' else 'processes'} "
        where += "(FSDP)" if plan["fsdp"] else "(DDP)"
    console.print()
    console.print(
        f"[bold]Memory plan[/bold] for {where}: micro_batch_size {plan['micro_batch_size']} x {plan['seq_len']} tokens, "
        f"gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}"
    )
    table = Table(show_edge=False, show_header=False)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("note", style="dim")
    for c in plan["resident"]:
        table.add_row(c["label"], format_bytes(c["bytes"]), c["note"])
    table.add_section()
    for c in plan["step"]:
        if c["bytes"] >= 2**20 or c["bytes"] >= plan["tensor_peak"] // 1000:  # not a few stray bytes
            table.add_row(c["label"], format_bytes(c["bytes"]), "at the step's peak")
    table.add_section()
    table.add_row("[bold]tensor peak[/bold]", f"[bold]{format_bytes(plan['tensor_peak'])}[/bold]", "")
    for c in plan["overhead"]:
        table.add_row(c["label"], format_bytes(c["bytes"]), c["note"])
    if plan["overhead"]:
        table.add_row("[bold]total on the GPU[/bold]", f"[bold]{format_bytes(plan['total'])}[/bold]", "")
    console.print(table)
    if plan["activations_with_checkpointing"] is not None:
        console.print(
            f"step peak with gradient checkpointing {format_bytes(plan['activations_with_checkpointing'])}, "
            f"without {format_bytes(plan['activations_without_checkpointing'])}"
        )
    if plan["eval_peak"] is not None:
        console.print(f"evaluation peak (tensors): {format_bytes(plan['eval_peak'])}")
    if plan["gpu_memory"] is not None:
        verdict = "[green]fits[/green]" if plan["fits"] else "[red]does not fit[/red]"
        line = f"{format_bytes(plan['gpu_memory'])} {'GPU' if plan['device'] == 'cuda' else 'budget'}: {verdict}"
        if plan["max_micro_batch_size"] is not None:
            line += f"; largest micro_batch_size that fits: [bold]{plan['max_micro_batch_size']}[/bold]"
        console.print(line)
    for note in plan["notes"]:
        console.print(f"[dim]note: {note}[/dim]")


# ---------------------------------------------------------------------------------------------
# data report


def data_report(cfg: RunConfig, n_examples: int = 3) -> dict[str, Any]:
    """What the model will be trained on: counts as ``data.pipeline.tokenize_rows`` makes them, per dataset; a length
    histogram; the first ``n_examples`` tokenized examples with their label mask; and warnings."""
    from qlora_cli.config import CHAT_TYPES, PREFERENCE_TYPES
    from qlora_cli.data.chat_templates import describe_chat_template, marker_warning
    from qlora_cli.data.pipeline import (
        IGNORE_INDEX,
        check_not_degenerate,
        draw_mixture,
        read_rows,
        tokenize_row,
        with_run_settings,
    )
    from qlora_cli.data.preference import tokenize_preference_rows
    from qlora_cli.model.loading import load_tokenizer, quiet_libraries

    quiet_libraries()
    tokenizer = load_tokenizer(cfg)
    eos = tokenizer.eos_token_id
    warnings: list[str] = []
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set one in the tokenizer files")
    if tokenizer.pad_token_id == eos:
        warnings.append(
            "pad token == EOS token: qlora still trains on EOS (masks come from lengths), but other tools that "
            "mask by pad id would drop it"
        )
    if any(spec.type in (*CHAT_TYPES, "preference", "unpaired") for spec in cfg.datasets):
        warning = marker_warning(cfg.chat_template, tokenizer)
        if warning:
            warnings.append(warning)
    datasets = []
    lengths: list[int] = []  # untruncated, train datasets
    shown: list[dict[str, Any]] = []
    no_eos: list[str] = []
    kept: list[Any] = []  # training examples, for the degenerate-data check
    shown_rows = 0  # preference rows shown
    parts: list[tuple[str, Any, list[Any]]] = []  # (split, spec, its training examples) for a mixture
    entries = [("train", s) for s in cfg.datasets] + [("eval", s) for s in cfg.eval_datasets]
    for split, spec in entries:
        if cfg.streaming and split == "train":  # a stream is never read whole: its first block, as training reads it
            from qlora_cli.data.stream import read_block

            rows = read_block(spec, 0, 1, cfg.stream_block_rows)[0]
            if not rows:
                raise DataError(f"dataset {spec.path} has no rows")
            if spec.type in CHAT_TYPES:
                from qlora_cli.data.chat_options import options_for

                for row in rows:
                    row.chat = options_for(spec, None)
            if len(rows) == cfg.stream_block_rows:
                warnings.append(f"{spec.path}: streamed; these counts are its first {len(rows):,} rows")
        else:
            rows = read_rows(spec)
        with_run_settings(rows, cfg.data)
        parts.append((split, spec, []))
        entry = {"split": split, "path": spec.path, "type": spec.type, "rows": len(rows), "examples": 0, "tokens": 0}
        entry.update({"target_tokens": 0, "truncated": 0, "dropped": 0, "skipped": False})
        datasets.append(entry)
        if spec.type in CHAT_TYPES and not getattr(tokenizer, "chat_template", None):
            warnings.append(
                f"{spec.path}: type {spec.type} but the tokenizer has no chat template; training would stop here "
                "(set chat_template to a name such as chatml or llama3, or a Jinja template)"
            )
            entry["skipped"] = True
            continue
        for row in rows:
            if spec.type in PREFERENCE_TYPES:  # a pair (or KTO response) cut as training cuts it, shown whole
                (ex,), counts = tokenize_preference_rows([row], spec.type, tokenizer, cfg.sequence_len)
                for key in ("truncated", "examples", "tokens", "target_tokens"):
                    entry[key] += getattr(counts, key)
                if split == "train":
                    lengths.append(len(ex.input_ids))
                    kept.append(ex)
                    parts[-1][2].append(ex)
                    if shown_rows < n_examples:  # a pair shows both responses
                        shown_rows += 1
                        for seq in (ex, ex.rejected) if ex.rejected is not None else (ex,):
                            shown.append(_example_view(seq, tokenizer, IGNORE_INDEX, _response_kind(ex, seq)))
                continue
            ex = tokenize_row(row, spec.type, tokenizer, cfg.train_on_inputs)
            ex.row, ex.fmt = row, spec.type
            if split == "train":
                lengths.append(len(ex.input_ids))
            if len(ex.input_ids) > cfg.sequence_len:  # as data.pipeline.tokenize_rows does
                ex.input_ids, ex.labels = ex.input_ids[: cfg.sequence_len], ex.labels[: cfg.sequence_len]
                entry["truncated"] += 1
            if ex.n_targets == 0:
                entry["dropped"] += 1
                continue
            entry["examples"] += 1
            entry["tokens"] += len(ex.input_ids)
            entry["target_tokens"] += ex.n_targets
            if split == "train":
                kept.append(ex)
                parts[-1][2].append(ex)
            if eos not in ex.labels[1:]:
                no_eos.append(row.where)
            if split == "train" and len(shown) < n_examples:
                shown.append(_example_view(ex, tokenizer, IGNORE_INDEX))
    if not cfg.allow_degenerate_data:
        check_not_degenerate(kept, tokenizer)  # as training would: an error, not a warning
    train = [d for d in datasets if d["split"] == "train"]
    totals = {
        k: sum(d[k] for d in train) for k in ("rows", "examples", "tokens", "target_tokens", "truncated", "dropped")
    }
    for d in datasets:
        if d["dropped"]:
            warnings.append(
                f"{d['path']}: {d['dropped']} example(s) have no target tokens (after truncation at "
                f"sequence_len={cfg.sequence_len}) and are dropped"
            )
    if no_eos:
        warnings.append(
            f"{len(no_eos)} example(s) have no EOS among their targets (first: {no_eos[0]}): the model does not "
            "learn to stop there (truncated at sequence_len, or a chat that does not end with the assistant)"
        )
    mixture = None
    if any(spec.weight is not None or spec.count is not None for spec in cfg.datasets):
        _, drawn = draw_mixture([(spec, ex) for split, spec, ex in parts if split == "train"], cfg.seed)
        mixture = [vars(p) for p in drawn]
        for key, field in (("examples", "drawn"), ("tokens", "tokens"), ("target_tokens", "target_tokens")):
            totals[key] = sum(p[field] for p in mixture)
    truncated = totals["truncated"]
    if truncated:
        warnings.append(f"{truncated} training example(s) are longer than sequence_len={cfg.sequence_len} and are cut")
    return {
        "kind": "data",
        "sequence_len": cfg.sequence_len,
        "train_on_inputs": cfg.train_on_inputs,
        "tokenizer": {"eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id},
        "chat_template": describe_chat_template(cfg.chat_template, tokenizer),
        "datasets": datasets,
        "train": totals,
        "mixture": mixture,
        "histogram": length_histogram(lengths, cfg.sequence_len),
        "examples": shown,
        "warnings": warnings,
    }


def _response_kind(ex: Any, seq: Any) -> str:
    if ex.rejected is not None:
        return "chosen" if seq is ex else "rejected"
    return "desirable" if ex.label else "undesirable"


def _example_view(ex: Any, tokenizer: Any, ignore: int, response: str | None = None) -> dict[str, Any]:
    where = ex.row.where if ex.row is not None else ""
    return {
        "where": f"{where} ({response})" if response else where,
        "input_ids": list(ex.input_ids),
        "labels": list(ex.labels),
        "target_mask": [label != ignore for label in ex.labels],  # True where the loss is taken
        "tokens": [tokenizer.decode([i]) for i in ex.input_ids],
    }


def length_histogram(lengths: list[int], sequence_len: int, bins: int = 10) -> list[dict[str, Any]]:
    """Counts of untruncated example lengths in at most ``bins`` equal bins from the shortest to the longest;
    a bin edge falls on ``sequence_len`` when it lies inside, so no bin mixes kept and truncated lengths."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / bins))
    if low <= sequence_len < high:  # shift the grid so that sequence_len ends a bin
        low = sequence_len + 1 - width * math.ceil((sequence_len + 1 - low) / width)
        low = max(low, 0)
    counts = Counter((n - low) // width for n in lengths)
    out = []
    for b in range(max(counts) + 1):
        lo, hi = low + b * width, low + (b + 1) * width - 1
        out.append({"from": lo, "to": hi, "count": counts.get(b, 0), "over_sequence_len": lo > sequence_len})
    return out


def render_data(report: dict[str, Any], console: Console) -> None:
    t = report["train"]
    console.print(
        f"[bold]training data[/bold]: {t['examples']:,} examples from {t['rows']:,} rows, {t['tokens']:,} tokens, "
        f"{t['target_tokens']:,} target tokens; truncated {t['truncated']}, dropped {t['dropped']} "
        f"(sequence_len {report['sequence_len']})"
    )
    if any(d["type"] in ("chat", "sharegpt") for d in report["datasets"]):
        console.print(f"[bold]chat template[/bold]: {report['chat_template']['source']}", highlight=False)
    table = Table(show_edge=False)
    for col in ("split", "dataset", "type", "rows", "examples", "tokens", "targets", "cut", "dropped"):
        if col in ("dataset", "type"):
            table.add_column(col, overflow="ellipsis", no_wrap=True)
        else:
            table.add_column(col, justify="left" if col == "split" else "right", no_wrap=True, min_width=len(col))
    for d in report["datasets"]:
        table.add_row(
            d["split"],
            Path(d["path"]).name,
            d["type"] + (" (skipped)" if d["skipped"] else ""),  # skipped: see the warnings
            *(f"{d[k]:,}" for k in ("rows", "examples", "tokens", "target_tokens", "truncated", "dropped")),
        )
    console.print(table)
    if report.get("mixture"):
        drawn = sum(p["drawn"] for p in report["mixture"]) or 1
        console.print("[bold]mixture[/bold] (the first epoch's draw; each epoch draws anew under seed)")
        for p in report["mixture"]:
            console.print(
                f"  {Path(p['path']).name}: {p['drawn']:,} of {p['examples']:,} examples "
                f"({100 * p['drawn'] / drawn:.1f}%), {p['tokens']:,} tokens, {p['target_tokens']:,} target tokens",
                highlight=False,
            )
    hist = report["histogram"]
    if hist:
        console.print("[bold]length[/bold] (tokens, before truncation)")
        peak = max(h["count"] for h in hist) or 1
        for h in hist:
            bar = "█" * max(1 if h["count"] else 0, round(30 * h["count"] / peak))
            style = "red" if h["over_sequence_len"] else "cyan"
            span = f"{h['from']}" if h["from"] == h["to"] else f"{h['from']}-{h['to']}"
            line = Text(f"{span:>13} ")
            line.append(bar, style=style)
            line.append(f" {h['count']}")
            console.print(line)
    brackets = not console.is_terminal or console.no_color  # styles do not survive a pipe: bracket the targets
    legend = "⟦trained on⟧" if brackets else f"[{TARGET_STYLE}]trained on[/{TARGET_STYLE}], [dim]context[/dim]"
    for i, ex in enumerate(report["examples"]):
        console.print(f"\n[bold]example {i + 1}[/bold] [dim]{ex['where']}[/dim]  ({legend})", highlight=False)
        console.print(render_tokens(ex["tokens"], ex["target_mask"], brackets))
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")


TARGET_STYLE = "reverse green"
CONTEXT_STYLE = "dim"


def render_tokens(tokens: list[str], mask: list[bool], brackets: bool = False) -> Text:
    """The example's text, token by token: trained-on tokens in ``TARGET_STYLE``, the rest dim; with
    ``brackets`` each run of trained-on tokens is also enclosed in ⟦ ⟧ (for output without colours)."""
    text = Text()
    previous = False
    for token, is_target in zip(tokens, mask):
        if brackets and is_target != previous:
            text.append("⟦" if is_target else "⟧")
        text.append(token.replace("\n", "↵\n"), style=TARGET_STYLE if is_target else CONTEXT_STYLE)
        previous = is_target
    if brackets and previous:
        text.append("⟧")
    return text


# ---------------------------------------------------------------------------------------------
# the command


def run_inspect(
    target: str,
    config: str | None,
    *,
    as_json: bool,
    gpu_memory: str | None,
    examples: int,
    device: str | None,
    console: Console,
    overrides: list[str] | None = None,
    processes: int = 1,
    fsdp: bool = False,
) -> dict[str, Any]:
    """Dispatch ``qlora inspect TARGET [CONFIG]`` and print the report (JSON or rich). Returns the report."""
    from qlora_cli.run_folder import folder_kind

    budget = parse_size(gpu_memory, "--gpu-memory") if gpu_memory is not None else None
    path = Path(target).expanduser()
    if target == "data" and (
        config is not None or folder_kind(path) not in ("run", "checkpoint", "best", "adapter")
    ):  # ./data may be a data folder
        if config is None:
            raise ConfigError("usage: qlora inspect data CONFIG.yaml")
        if processes != 1 or fsdp:
            raise ConfigError("--processes and --fsdp apply to a config's memory plan, not to its data")
        report = data_report(load_config(config, overrides), examples)
    else:
        if config is not None:
            raise ConfigError(
                f"unexpected argument {config!r}: qlora inspect CONFIG.yaml | data CONFIG.yaml | RUN_FOLDER"
            )
        if not path.exists():
            raise ConfigError(
                f"not found: {target} (expected a config YAML, a run or adapter folder, or `data CONFIG`)"
            )
        if path.is_dir():
            if overrides or processes != 1 or fsdp:
                raise ConfigError("--set, --processes and --fsdp apply to a config, not to an adapter folder")
            report = adapter_report(path)
        else:
            report = config_report(load_config(path, overrides), budget, device, processes, fsdp)
    if as_json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        {"config": render_config, "data": render_data, "adapter": render_adapter}[report["kind"]](report, console)
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, MemoryPlan):
        return value.to_dict()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
