"""The run folder's ``README.md``: a Hugging Face model card for the adapter.

    ---                                  YAML front matter the Hub reads: base_model, library_name: peft,
    base_model: ...                      tags, datasets (hub names only), license (when the base's is known)
    ---
    # run name                           what was trained on what, hyperparameters, final and best eval,
    ...                                  the loss plot, how to load the adapter (PEFT, vLLM, qlora serve)

Everything comes from the run folder itself (``qlora_config.yaml``, ``metrics.jsonl``, ``best/``), so ``train``
writes it at the end and ``qlora eval --json`` can rewrite it later with its scores.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from qlora_cli.config import DATA_EXTENSIONS, RunConfig, load_config
from qlora_cli.layout import BEST_DIR, BEST_FILE, CARD_FILE, CONFIG_FILE, PLOT_FILE
from qlora_cli.run_folder import read_metrics


def is_hub_name(name: str) -> bool:
    """``org/name`` that is not a local path or data file: a name the Hub can link."""
    return (
        re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
        and not Path(name).expanduser().exists()
        and not name.endswith(DATA_EXTENSIONS)
    )


def base_license(base_model: str) -> str | None:
    """The base model's license when its files say it: a local folder's model card, or a GGUF file's
    ``general.license``. Hub ids are not looked up (no network)."""
    path = Path(base_model).expanduser()
    try:
        if path.is_dir() and (path / CARD_FILE).is_file():
            meta = front_matter((path / CARD_FILE).read_text())
            license_ = meta.get("license")
            return str(license_) if license_ else None
        if path.is_file() and path.suffix == ".gguf":
            from qlora_cli.model.gguf import _gguf_field, _gguf_reader

            value = _gguf_field(_gguf_reader(str(path)), "general.license")
            return value if isinstance(value, str) and value else None
    except Exception:  # noqa: BLE001 - a license we cannot read is a license we do not know
        return None
    return None


def front_matter(text: str) -> dict[str, Any]:
    """The YAML between the leading ``---`` lines of a model card ({} when there is none)."""
    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def card_metadata(cfg: RunConfig) -> dict[str, Any]:
    meta: dict[str, Any] = {"base_model": cfg.base_model, "library_name": "peft"}
    license_ = base_license(cfg.base_model)
    if license_:
        meta["license"] = license_
    tags = ["qlora", "lora", "peft", "text-generation"]
    if cfg.load_in_4bit:
        tags.append(cfg.bnb_4bit_quant_type)
    if is_hub_name(cfg.base_model):
        tags.insert(0, f"base_model:adapter:{cfg.base_model}")
    meta["tags"] = tags
    hub = [d.path for d in (*cfg.datasets, *cfg.eval_datasets) if is_hub_name(d.path)]
    if hub:
        meta["datasets"] = list(dict.fromkeys(hub))
    meta["pipeline_tag"] = "text-generation"
    return meta


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _data_lines(cfg: RunConfig, summary: dict[str, Any]) -> list[str]:
    lines = ["## Training data", ""]
    for d in cfg.datasets:
        lines.append(f"- `{Path(d.path).name if not is_hub_name(d.path) else d.path}` ({d.type})")
    if summary.get("train_examples") is not None:
        lines.append(
            f"\n{summary['train_examples']:,} training examples, {summary.get('train_target_tokens') or 0:,} target "
            f"tokens (the tokens the loss is computed on; `train_on_inputs: {str(cfg.train_on_inputs).lower()}`), "
            f"sequence length {cfg.sequence_len}{', packed' if cfg.sample_packing else ''}."
        )
    if cfg.eval_datasets:
        names = ", ".join(f"`{Path(d.path).name if not is_hub_name(d.path) else d.path}`" for d in cfg.eval_datasets)
        lines.append(f"Eval data: {names}.")
    elif cfg.val_set_size:
        lines.append(f"Eval data: {cfg.val_set_size:g} of the training rows, held out.")
    return lines + [""]


def _hyperparameter_lines(cfg: RunConfig) -> list[str]:
    quant = (
        f"{cfg.bnb_4bit_quant_type.upper()} 4-bit{' + double quantization' if cfg.bnb_4bit_use_double_quant else ''}"
        if cfg.load_in_4bit
        else "16-bit (no quantization)"
    )
    targets = (
        cfg.lora_target_modules if isinstance(cfg.lora_target_modules, str) else ", ".join(cfg.lora_target_modules)
    )
    rows = [
        ("base quantization", quant),
        ("compute dtype", cfg.bnb_4bit_compute_dtype),
        ("LoRA r / alpha / dropout", f"{cfg.lora_r} / {cfg.lora_alpha:g} / {cfg.lora_dropout:g}"),
        ("adapter", _adapter_kind(cfg)),
        ("LoRA targets", targets),
        ("learning rate", f"{cfg.learning_rate:g} ({cfg.lr_scheduler}, {cfg.warmup_steps} warmup steps)"),
        ("optimizer", f"{cfg.optimizer} (weight decay {cfg.weight_decay:g}, max grad norm {cfg.max_grad_norm})"),
        ("batch", f"{cfg.micro_batch_size} x {cfg.gradient_accumulation_steps} accumulation"),
        ("length", f"max_steps {cfg.max_steps}" if cfg.max_steps else f"{cfg.num_epochs:g} epochs"),
        ("seed", str(cfg.seed)),
    ]
    if cfg.early_stopping_patience:
        rows.append(
            ("early stopping", f"patience {cfg.early_stopping_patience}, threshold {cfg.early_stopping_threshold:g}")
        )
    lines = ["## Hyperparameters", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines + ["", "The full config is `qlora_config.yaml` in this folder.", ""]


def _result_lines(run_dir: Path, records: list[dict[str, Any]], evaluation: dict[str, Any] | None) -> list[str]:
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), {})
    evals = [r for r in records if r.get("type") == "eval" and isinstance(r.get("eval_loss"), (int, float))]
    lines = ["## Results", ""]
    if summary:
        lines.append(f"- steps: {summary.get('steps')}")
        lines.append(f"- final train loss: {_fmt(summary.get('train_loss'))}")
    if evals:
        last, best = evals[-1], min(evals, key=lambda r: r["eval_loss"])
        lines.append(f"- final eval loss: {_fmt(last['eval_loss'])} (perplexity {_fmt(last.get('eval_ppl'), 2)})")
        lines.append(f"- best eval loss: {_fmt(best['eval_loss'])} at step {best['step']}")
    if summary.get("stopped_early"):
        lines.append(f"- stopped early: {summary['stopped_early']}")
    best_file = run_dir / BEST_DIR / BEST_FILE
    if best_file.exists():
        try:
            best_saved = json.loads(best_file.read_text())
            lines.append(
                f"- `best/` holds the adapter of step {best_saved['step']} (eval loss {_fmt(best_saved['eval_loss'])})"
            )
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if evaluation:
        lines += ["", f"`qlora eval` on {evaluation.get('source', 'the eval data')}:", ""]
        lines += ["| model | loss | perplexity | exact match | examples |", "| --- | --- | --- | --- | --- |"]
        for m in evaluation.get("models", []):
            lines.append(
                f"| {m['name']} | {_fmt(m.get('loss'))} | {_fmt(m.get('perplexity'), 2)} | "
                f"{_fmt(m.get('exact_match'), 3)} | {m.get('n_examples')} |"
            )
    if (run_dir / PLOT_FILE).exists():
        lines += ["", f"![training curves]({PLOT_FILE})"]
    if len(lines) == 2:
        lines.append("No metrics recorded.")
    return lines + [""]


def _adapter_kind(cfg: RunConfig) -> str:
    kind = "DoRA" if cfg.use_dora else "LoRA"
    init = cfg.init_lora_weights
    if init == "default":
        return kind
    if cfg.lora.offset_start:
        return f"{kind}, {init} start (saved in PEFT's converted form: plain LoRA of rank {2 * cfg.lora_r})"
    return f"{kind}, {init} start"


def _usage_lines(cfg: RunConfig, name: str) -> list[str]:
    base = cfg.base_model
    from qlora_cli.model.adapter_io import VLLM_MAX_LORA_RANKS

    rank = 2 * cfg.lora_r if cfg.lora.offset_start else cfg.lora_r  # PiSSA / OLoRA: saved converted, rank 2r
    vllm_rank = next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), rank)
    load_base = f'"{base}"'
    if base.endswith(".gguf"):  # transformers reads a GGUF base from its folder and file name
        load_base = f'"{Path(base).parent}", gguf_file="{Path(base).name}"'
    return [
        "## Use",
        "",
        "With PEFT (load the base in 4 bits as it was trained, or in 16 bits):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({load_base})",
        f'model = PeftModel.from_pretrained(base, "./{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("./{name}")',
        "```",
        "",
        "With vLLM:",
        "",
        "```bash",
        f"vllm serve {base} --enable-lora --lora-modules {name}=./{name} --max-lora-rank {vllm_rank}",
        "```",
        "",
        "With qlora (OpenAI-compatible server, several adapters on one base):",
        "",
        "```bash",
        f"qlora serve --adapter {name}=./{name}",
        f'qlora generate ./{name} --prompt "..."',
        "```",
        "",
        f"Merged full weights (plain transformers, vLLM without LoRA): `qlora merge ./{name} --output merged/`.",
        "",
    ]


def render_card(run_dir: Path, cfg: RunConfig, evaluation: dict[str, Any] | None = None) -> str:
    records = read_metrics(run_dir)
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), {})
    name = run_dir.name
    meta = yaml.safe_dump(card_metadata(cfg), sort_keys=False, allow_unicode=True)
    lines = [
        f"---\n{meta}---",
        "",
        f"# {name}",
        "",
        f"A LoRA adapter for `{cfg.base_model}`, trained with qlora on a "
        f"{'4-bit ' + cfg.bnb_4bit_quant_type.upper() if cfg.load_in_4bit else '16-bit'} base. "
        "The files are in PEFT's format.",
        "",
        *_data_lines(cfg, summary),
        *_hyperparameter_lines(cfg),
        *_result_lines(run_dir, records, evaluation),
        *_usage_lines(cfg, name),
    ]
    return "\n".join(lines)


def write_model_card(
    run_dir: str | Path, cfg: RunConfig | None = None, evaluation: dict[str, Any] | None = None
) -> Path:
    """Write ``run_dir/README.md`` (atomically) from the run folder's files; ``cfg`` defaults to its
    ``qlora_config.yaml``; ``evaluation`` is ``qlora eval``'s JSON for this adapter (and its base)."""
    run_dir = Path(run_dir)
    if cfg is None:
        cfg = load_config(run_dir / CONFIG_FILE)
    text = render_card(run_dir, cfg, evaluation)
    out = run_dir / CARD_FILE
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{CARD_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
