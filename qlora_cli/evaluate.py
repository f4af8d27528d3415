"""``qlora eval``: loss, perplexity and task accuracy of adapters beside their base, on the user's data.

    folders (run / adapter / merged model) -> eval rows (--data, else the run's eval data)
        -> per model: token-weighted loss with training's masking  (train.loss.evaluate_loss on data.pipeline.tokenize_rows)
                      greedy generation vs the reference             (completion, alpaca, chat rows)
        -> one table with deltas vs the base, --samples, --json

Adapters are compared on one base, loaded once: the base is scored first, before any LoRA layer exists,
then each adapter is injected, scored and unwrapped again. Prompts are tokenized exactly as in training
(``data.pipeline.tokenize_row`` builds the same prefix), batched with left padding and decoded with the KV cache.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from qlora_cli.config import PREFERENCE_TYPES, DatasetSpec, DataSettings, ModelSettings, QuantSettings, RunConfig
from qlora_cli.data.pipeline import (
    DataStats,
    Example,
    Row,
    build_datasets,
    read_rows,
    tokenize_rows,
)
from qlora_cli.errors import ConfigError, DataError, ModelError
from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG
from qlora_cli.model.loading import autocast as training_autocast
from qlora_cli.model.loading import context_length, stop_token_ids
from qlora_cli.run_folder import RunFolder
from qlora_cli.scoring import GenerationCase, generation_case, score_generations

FORMATS = ("completion", "alpaca", "chat", "text", "preference", "unpaired")
AUTO_MAX_NEW_TOKENS_CAP = 256  # the longest reference + AUTO_MARGIN, at most this, unless --max-new-tokens
AUTO_MARGIN = 8  # generate past the reference, so an answer that does not stop is not an exact match

# ---------------------------------------------------------------------------------------------
# what to evaluate: folders


@dataclass
class Candidate:
    """One folder on the command line: an adapter (scored on its base) or a plain/merged model."""

    path: Path
    name: str
    settings: ModelSettings  # how to load the base (adapters) or the model itself (plain folders)
    config: RunConfig | None  # the training config saved beside it, when there is one
    is_adapter: bool
    run: RunFolder | None = None  # an adapter's folder as read (its tensors: read once)


def open_candidate(
    path: str | Path, base: str | None = None, dtype: str | None = None, load_in_4bit: bool = False
) -> Candidate:
    """Classify one input folder. Raises ``ModelError`` for a missing folder or one holding neither kind."""
    from qlora_cli.layout import CONFIG_FILE
    from qlora_cli.model.loading import check_base_model
    from qlora_cli.run_folder import folder_kind, open_run

    folder = Path(path).expanduser()
    name = folder.resolve().name or str(path)
    if not folder.exists():
        raise ModelError(f"run folder not found: {path}")
    if not folder.is_dir():
        raise ModelError(f"expected a run, adapter or model folder, got a file: {path}")
    kind = folder_kind(folder)
    if kind == "other":
        raise ModelError(
            f"{path} is neither a run/adapter folder ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}) nor a model folder "
            f"({MODEL_CONFIG})"
        )
    if kind != "model":
        run = open_run(folder, base=base)  # a checkpoint inside a run loads the base as that run trained
        settings, config = run.model, run.config
        if dtype is not None:
            settings = replace(settings, quant=replace(settings.quant, compute_dtype=dtype))
        check_base_model(settings)
        return Candidate(folder, name, settings, config, is_adapter=True, run=run)
    # A plain (e.g. merged) model folder: 16-bit as saved unless --load-in-4bit.
    config = None
    if (folder / CONFIG_FILE).exists():  # a merge may keep the run's config: its eval data and sequence_len
        from qlora_cli.config import load_config

        try:
            config = load_config(folder / CONFIG_FILE)
        except ConfigError as e:
            raise ModelError(f"model folder {path}: {e}") from None
    quant = QuantSettings(load_in_4bit=load_in_4bit, compute_dtype=dtype or _checkpoint_dtype(folder))
    settings = ModelSettings(base_model=str(folder), quant=quant)
    check_base_model(settings)
    return Candidate(folder, name, settings, config, is_adapter=False)


def _checkpoint_dtype(folder: Path) -> str:
    """The dtype a model folder was saved in (float32 when it does not say)."""
    try:
        cfg = json.loads((folder / MODEL_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{folder / MODEL_CONFIG}: cannot read ({e})") from None
    saved = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return saved if saved in ("float32", "bfloat16", "float16") else "float32"


def _base_identity(settings: ModelSettings) -> tuple:
    from qlora_cli.model.loading import is_local

    name = settings.base_model
    if is_local(name):
        name = str(Path(name).expanduser().resolve())
    return (name, settings.quant, settings.trust_remote_code, settings.attn_implementation)


def check_one_base(adapters: list[Candidate]) -> None:
    """Adapters are compared on one loaded base: they must name the same base, quantized the same way."""
    first = adapters[0]
    for other in adapters[1:]:
        a, b = _base_identity(first.settings), _base_identity(other.settings)
        if a[0] != b[0]:
            raise ModelError(
                f"{first.name} and {other.name} were trained on different base models ({first.settings.base_model} "
                f"vs {other.settings.base_model}); eval compares adapters on one base (evaluate them separately, "
                "or pass --base)"
            )
        if a != b:
            raise ModelError(
                f"{first.name} and {other.name} load their base differently ({_describe(first.settings)} vs "
                f"{_describe(other.settings)}); evaluate them separately, or pass --dtype"
            )


def _describe(settings: ModelSettings) -> str:
    q = settings.quant
    return f"4-bit {q.quant_type}, compute {q.compute_dtype}" if q.load_in_4bit else f"{q.compute_dtype} weights"


def _unique_names(candidates: list[Candidate], include_base: bool) -> None:
    """Display names: the folder name; the path as given where two folders share a name (or one is 'base')."""
    taken = {"base"} if include_base else set()
    counts: dict[str, int] = {}
    for c in candidates:
        counts[c.name] = counts.get(c.name, 0) + 1
    for c in candidates:
        if counts[c.name] > 1 or c.name in taken:
            c.name = str(c.path)
        taken.add(c.name)


# ---------------------------------------------------------------------------------------------
# what to evaluate: data


@dataclass
class EvalRows:
    items: list[tuple[Row, str]]  # (row, format), in file order
    source: str  # for the report: "data/test.jsonl (completion)"


def infer_format(row: Row) -> str | None:
    f = row.fields
    if "chosen" in f and "rejected" in f:
        return "preference"
    if "label" in f and "completion" in f:
        return "unpaired"
    if "messages" in f or "conversations" in f:
        return "chat"
    if "instruction" in f:
        return "alpaca"
    if "prompt" in f or "completion" in f:
        return "completion"
    if "text" in f:
        return "text"
    return None


def rows_from_file(path: str, fmt: str | None, split: str = "train") -> EvalRows:
    """Rows of ``--data``; the format is ``fmt`` or read off the first row's fields."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--type must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows = read_rows(DatasetSpec(path=path, type=fmt or "completion", split=split))
    if fmt is None:
        fmt = infer_format(rows[0])
        if fmt is None:
            fields = ", ".join(sorted(rows[0].fields)) or "none"
            raise DataError(
                f"{rows[0].where}: cannot tell the data format from the fields ({fields}); pass --type "
                f"{'|'.join(FORMATS)}"
            )
    return EvalRows([(r, fmt) for r in rows], f"{path} ({fmt})")


def rows_from_run(config: RunConfig, tokenizer: Any, where: str) -> EvalRows | None:
    """The run's eval data: ``eval_datasets``, else the ``val_set_size`` split of its training data, rebuilt
    exactly as training built it (same tokenizer, same seed). None when the run had no eval data."""
    if config.eval_datasets:
        try:
            items = [(r, spec.type) for spec in config.eval_datasets for r in read_rows(spec)]
        except DataError as e:
            raise DataError(f"eval_datasets of {where}: {e} (or pass --data PATH)") from None
        names = ", ".join(f"{s.path} ({s.type})" for s in config.eval_datasets)
        return EvalRows(items, f"eval_datasets of {where}: {names}")
    if config.val_set_size > 0:
        try:
            split = build_datasets(config.data, tokenizer)
        except DataError as e:
            raise DataError(f"rebuilding the val_set_size split of {where}: {e}") from None
        items = [(ex.row, ex.fmt) for ex in split.eval if ex.row is not None]
        return EvalRows(items, f"val_set_size={config.val_set_size:g} split of {where}'s training data")
    return None


def data_settings(config: RunConfig | None, max_positions: int | None) -> DataSettings:
    """Masking and truncation as the run trained with; without a run, the model's context length."""
    if config is not None:
        return config.data
    return DataSettings([], [], 0.0, False, max(2, max_positions or 2048), 0)


@dataclass
class Prepared:
    """The eval rows tokenized for one tokenizer: loss examples and, aligned, generation cases."""

    examples: list[Example]
    cases: list[GenerationCase | None]  # None for text rows (and chats that end without an assistant turn)
    stats: DataStats


def prepare(items: list[tuple[Row, str]], tokenizer: Any, settings: DataSettings, limit: int | None) -> Prepared:
    """Tokenize rows as training does (same masking, same truncation); keep the first ``limit`` examples.
    Raises ``DataError`` for a row without the needed fields, naming its file and line."""
    if any(fmt in ("chat", "sharegpt") for _, fmt in items) and not getattr(tokenizer, "chat_template", None):
        raise DataError("the eval data has type chat but the tokenizer has no chat template")
    examples: list[Example] = []
    cases: list[GenerationCase | None] = []
    stats = DataStats()
    items = [as_chosen(row, tokenizer) if fmt in PREFERENCE_TYPES else (row, fmt) for row, fmt in items]
    items = [(row, fmt) for row, fmt in items if row is not None]
    for row, fmt in items:
        if limit is not None and len(examples) >= limit:
            break
        kept, s = tokenize_rows([row], fmt, tokenizer, settings)
        stats.add(s)
        if kept:
            examples.append(kept[0])
            cases.append(generation_case(row, fmt, tokenizer))
    if not examples:
        raise DataError(
            f"no eval examples left: all {stats.rows} rows have no target tokens after truncation "
            f"at sequence_len={settings.sequence_len}"
        )
    return Prepared(examples, cases, stats)


def as_chosen(row: Row, tokenizer: Any) -> tuple[Row | None, str]:
    """A preference pair as the row its chosen response makes: loss, exact match and contains are scored on it."""
    from qlora_cli.data.preference import _pair_fields, _unpaired_fields

    if "label" in row.fields:  # KTO's labelled responses: the desirable ones are scored, the others skipped
        prompt, chosen, good = _unpaired_fields(row)
        if not good:
            return None, ""
    else:
        prompt, chosen, _ = _pair_fields(Row(row.where, dict(row.fields)))
    if isinstance(prompt, str) and isinstance(chosen, str) and not getattr(tokenizer, "chat_template", None):
        return Row(row.where, {"prompt": prompt, "completion": chosen}), "completion"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{row.where}: conversational preference rows need a chat template; the tokenizer has none")
    before = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    after = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
    return Row(row.where, {"messages": before + after}), "chat"


@dataclass
class Pairs:
    """Preference pairs tokenized for one tokenizer, and each model's summed log-probabilities of them."""

    examples: list[Example]  # the chosen responses, each with its .rejected
    beta: float  # the reward's scale: the run's beta

    @classmethod
    def build(
        cls, items: list[tuple[Row, str]], tokenizer: Any, settings: DataSettings, limit: int | None, beta: float
    ):
        from qlora_cli.data.preference import tokenize_preference_rows

        rows = [row for row, fmt in items if fmt == "preference"][:limit]
        examples, _ = tokenize_preference_rows(rows, "preference", tokenizer, settings.sequence_len)
        return cls(examples, beta)

    def logps(self, model: Any, batch_size: int, device: torch.device, pad_id: int, autocast: Any) -> torch.Tensor:
        """(N, 2): summed log-probability of each pair's chosen and rejected response under ``model``."""
        from qlora_cli.train.preference import sequence_logps

        out = []
        with torch.no_grad():
            for at in range(0, len(self.examples), batch_size):
                part = self.examples[at : at + batch_size]
                with autocast():
                    lp, _ = sequence_logps(model, part + [e.rejected for e in part], device, pad_id)
                out.append(torch.stack(lp.float().cpu().chunk(2), dim=1))
        return torch.cat(out)

    def score(self, score: ModelScore, logps: torch.Tensor, reference: torch.Tensor | None) -> None:
        score.prefers_chosen = float((logps[:, 0] > logps[:, 1]).float().mean())
        if reference is not None:
            ratios = logps - reference
            margin = self.beta * (ratios[:, 0] - ratios[:, 1])
            score.reward_accuracy = float((margin > 0).float().mean())
            score.reward_margin = float(margin.mean())


# ---------------------------------------------------------------------------------------------
# scoring one model


@dataclass
class ModelScore:
    name: str
    loss: float  # mean cross-entropy per target token, every target token weighted the same
    perplexity: float  # exp(loss)
    n_examples: int
    n_tokens: int  # target tokens
    exact_match: float | None  # None when no row has a reference answer (text data)
    contains: float | None
    predictions: list[str | None] = field(default_factory=list, repr=False)  # aligned with the examples
    path: Path | None = None  # the adapter's folder (None for the base)
    # preference data: the share of pairs whose chosen response is the more likely one (summed log-probability),
    # and, for an adapter, DPO's implicit reward against its reference: accuracy and mean margin
    prefers_chosen: float | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None

    def to_json(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return x if x is None or math.isfinite(x) else None

        return {
            "name": self.name,
            "loss": num(self.loss),
            "perplexity": num(self.perplexity),
            "exact_match": self.exact_match,
            "contains": self.contains,
            "n_examples": self.n_examples,
            **{
                k: getattr(self, k)
                for k in ("prefers_chosen", "reward_accuracy", "reward_margin")
                if getattr(self, k) is not None
            },
        }


def autocast_for(compute_dtype: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The autocast training ran under (step.Precision): none in float32, else the compute dtype."""
    if compute_dtype == "float16" and device.type == "cpu":
        raise ConfigError("compute dtype float16 needs a GPU; pass --dtype float32 or bfloat16 on CPU")
    return partial(training_autocast, compute_dtype, device)


def auto_max_new_tokens(tokenizer: Any, cases: list[GenerationCase | None]) -> int:
    longest = max((len(tokenizer(c.reference, add_special_tokens=False)["input_ids"]) for c in cases if c), default=0)
    return min(longest + AUTO_MARGIN, AUTO_MAX_NEW_TOKENS_CAP)


def score_model(
    name: str,
    model: Any,
    tokenizer: Any,
    data: Prepared,
    *,
    batch_size: int,
    max_new_tokens: int | None,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> ModelScore:
    """Loss and perplexity over every example; exact match and contains over those with a reference."""
    from qlora_cli.train.loss import evaluate_loss

    result = evaluate_loss(model, data.examples, batch_size, tokenizer.pad_token_id, device, autocast)
    with_answer = [i for i, c in enumerate(data.cases) if c is not None]
    predictions: list[str | None] = [None] * len(data.cases)
    em = ct = None
    if with_answer:
        cases = [data.cases[i] for i in with_answer]
        chat = any(data.examples[i].fmt == "chat" for i in with_answer)
        new_tokens = max_new_tokens or auto_max_new_tokens(tokenizer, cases)
        stops = stop_token_ids(model, tokenizer, chat)
        task = score_generations(model, tokenizer, cases, new_tokens, batch_size, stops, autocast)
        em, ct = task.exact_match, task.contains
        for i, p in zip(with_answer, task.predictions):
            predictions[i] = p
    return ModelScore(name, result.loss, result.perplexity, len(data.examples), result.n_tokens, em, ct, predictions)


# ---------------------------------------------------------------------------------------------
# the command


@dataclass
class EvalOptions:
    data: str | None = None  # --data: a file (or hub dataset); default: the run's eval data
    fmt: str | None = None  # --type; default: read off the first row
    split: str = "train"  # hub datasets only
    base: str | None = None  # --base: load the adapters on this base model instead of the one they name
    limit: int | None = None  # evaluate the first N examples
    max_new_tokens: int | None = None  # default: the longest reference + 8 tokens, at most 256
    batch_size: int | None = None  # default: the run's eval batch size, else 8
    include_base: bool = True  # score the base (adapters disabled) beside the adapters
    device: str = "auto"
    dtype: str | None = None  # compute dtype override (adapters' base) / load dtype (model folders)
    load_in_4bit: bool = False  # model folders: quantize to NF4 on load


@dataclass
class EvalReport:
    models: list[ModelScore]
    source: str
    prompts: list[str]  # each example's generation prompt, decoded ("" where there is no reference), for --samples
    references: list[str | None]  # aligned with ModelScore.predictions
    stats: DataStats

    def to_json(self) -> dict[str, Any]:
        return {"models": [m.to_json() for m in self.models]}


def _remove_lora(model: torch.nn.Module) -> None:
    """Put every wrapped layer back: the model is the untouched base again (the base weights never changed)."""
    from qlora_cli.model.lora import lora_layers
    from qlora_cli.model.token_rows import row_modules

    for name, layer in [*lora_layers(model), *row_modules(model)]:  # trained token rows too
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)


def _free_memory() -> None:
    """Give a dropped model's memory back before the next model loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _same_forward_as_training(model: torch.nn.Module, config: RunConfig | None) -> None:
    """Run the LoRA layers through the code path training used (``fused_lora``), so the loss equals the
    eval_loss training logged to the last bit also under bf16 (the paths differ only by rounding)."""
    from qlora_cli.model.lora import set_fused

    set_fused(model, config.fused_lora if config is not None else False)


def evaluate(inputs: list[str | Path], options: EvalOptions, log: Any = None) -> EvalReport:
    """Score every input folder (and, unless ``include_base`` is off, the adapters' base) on one eval set.

    Every user error (folders, data, an adapter that does not fit) is raised before any model is scored.
    """
    from rich.markup import escape

    from qlora_cli.model.adapter_io import load_adapter
    from qlora_cli.model.loading import load_base_model, load_tokenizer, quiet_libraries, resolve_device

    say = log.print if log is not None else (lambda *a, **k: None)
    quiet_libraries()
    if not inputs:
        raise ConfigError("give at least one run, adapter or model folder")
    if options.dtype is not None and options.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {options.dtype!r}")
    if options.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {options.device!r}")
    device = resolve_device(options.device)
    candidates = [open_candidate(p, options.base, options.dtype, options.load_in_4bit) for p in inputs]
    adapters = [c for c in candidates if c.is_adapter]
    plain = [c for c in candidates if not c.is_adapter]
    if adapters:
        check_one_base(adapters)
    include_base = options.include_base and bool(adapters)
    _unique_names(candidates, include_base)
    for c in candidates:
        autocast_for(c.settings.quant.compute_dtype, device)  # float16 on CPU fails here, before loading

    # -- the eval rows, tokenized with the first model's tokenizer (validates every row up front)
    first = adapters[0] if adapters else plain[0]
    tokenizer = load_tokenizer(first.settings)
    if options.data is not None:
        rows = rows_from_file(options.data, options.fmt, options.split)
    else:
        rows = None
        for c in candidates:
            if c.config is not None:
                rows = rows_from_run(c.config, tokenizer if c is first else load_tokenizer(c.settings), c.name)
            if rows is not None:
                break
        if rows is None:
            names = ", ".join(c.name for c in candidates)
            raise DataError(f"no eval data: {names} has no eval_datasets or val_set_size; pass --data PATH")
    config = next((c.config for c in candidates if c.config is not None), None)
    batch_size = options.batch_size or (config.eval_micro_batch_size if config else 8)

    def settings_for(model: Any) -> DataSettings:
        return data_settings(config, context_length(model))

    prepared = prepare(rows.items, tokenizer, data_settings(config, None), options.limit)
    say(f"[bold]qlora eval[/bold] on {device.type}: {len(prepared.examples)} examples from {escape(rows.source)}")
    preference = any(fmt == "preference" for _, fmt in rows.items)
    beta = config.beta if config is not None else 0.1
    references: dict[str, Path] = {}  # adapter name -> its run's ref_adapter, the rewards' reference
    for c in adapters if preference else []:
        ref = c.config.ref_adapter if c.config is not None else None
        if ref:
            references[c.name] = Path(ref).expanduser()
            if not references[c.name].is_dir():
                raise ConfigError(f"{c.name} was tuned against ref_adapter {ref}, which is not there to score against")

    kw: dict[str, Any] = dict(batch_size=batch_size, max_new_tokens=options.max_new_tokens, device=device)
    scores: list[ModelScore] = []
    if adapters:
        settings = adapters[0].settings
        say(f"loading base {escape(settings.base_model)} ({_describe(settings)})")
        model = load_base_model(settings, device)
        model.eval()
        prepared = prepare(rows.items, tokenizer, settings_for(model), options.limit)
        for c in adapters:  # every adapter must fit before anything is scored
            load_adapter(model, c.path, c.run.adapter if c.run else None)
            _remove_lora(model)
        autocast = autocast_for(settings.quant.compute_dtype, device)
        pairs = Pairs.build(rows.items, tokenizer, settings_for(model), options.limit, beta) if preference else None
        pad = tokenizer.pad_token_id
        base_logps = pairs.logps(model, batch_size, device, pad, autocast) if pairs else None
        if include_base:
            scores.append(score_model("base", model, tokenizer, prepared, autocast=autocast, **kw))
            if pairs:
                pairs.score(scores[-1], base_logps, None)
            say(_one_line(scores[-1]))
        for c in adapters:
            reference = base_logps
            if pairs and c.name in references:  # DPO on top of an earlier adapter
                load_adapter(model, references[c.name])
                model.eval()
                reference = pairs.logps(model, batch_size, device, pad, autocast)
                _remove_lora(model)
            load_adapter(model, c.path, c.run.adapter if c.run else None)
            _same_forward_as_training(model, c.config)
            model.eval()
            scores.append(score_model(c.name, model, tokenizer, prepared, autocast=autocast, **kw))
            scores[-1].path = c.path
            if pairs:
                pairs.score(scores[-1], pairs.logps(model, batch_size, device, pad, autocast), reference)
            _remove_lora(model)
            say(_one_line(scores[-1]))
        del model
        _free_memory()
    for c in plain:
        say(f"loading {escape(str(c.path))} ({_describe(c.settings)})")
        model = load_base_model(c.settings, device)
        model.eval()
        tok = load_tokenizer(c.settings)
        data = prepare(rows.items, tok, settings_for(model), options.limit)
        autocast = autocast_for(c.settings.quant.compute_dtype, device)
        scores.append(score_model(c.name, model, tok, data, autocast=autocast, **kw))
        if preference:
            pairs = Pairs.build(rows.items, tok, settings_for(model), options.limit, beta)
            pairs.score(scores[-1], pairs.logps(model, batch_size, device, tok.pad_token_id, autocast), None)
        say(_one_line(scores[-1]))
        if not adapters and c is plain[0]:
            prepared = data  # the samples table shows the first model's examples
        del model
        _free_memory()
    prompts = [tokenizer.decode(c.prompt_ids, skip_special_tokens=True) if c else "" for c in prepared.cases]
    references = [c.reference if c else None for c in prepared.cases]
    return EvalReport(scores, rows.source, prompts, references, prepared.stats)


def _one_line(s: ModelScore) -> str:
    from rich.markup import escape

    em = f"  exact match {s.exact_match:.1%}" if s.exact_match is not None else ""
    pref = f"  prefers chosen {s.prefers_chosen:.1%}" if s.prefers_chosen is not None else ""
    if s.reward_accuracy is not None:
        pref += f"  reward accuracy {s.reward_accuracy:.1%}  margin {s.reward_margin:+.3f}"
    return f"{escape(s.name)}: loss {s.loss:.4f}  ppl {s.perplexity:.3g}{em}{pref}"


# ---------------------------------------------------------------------------------------------
# output


def _delta(value: float | None, base: float | None, lower_is_better: bool, percent: bool) -> str:
    if value is None or base is None:
        return ""
    d = value - base
    better = d < 0 if lower_is_better else d > 0
    color = "green" if better else "red" if d != 0 else "dim"
    text = f"{100 * d:+.1f} pp" if percent else f"{d:+.4f}"
    return f"\n[{color}]{text}[/{color}]"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def results_table(report: EvalReport) -> Any:
    """One row per model; under each adapter's numbers, its change from the base (green: better)."""
    from rich.table import Table

    base = next((m for m in report.models if m.name == "base"), None)
    n = report.models[0].n_examples if report.models else 0
    caption = "under each adapter's numbers: the change from the base" if base and len(report.models) > 1 else None
    table = Table(title=f"qlora eval: {n} examples, {report.source}", title_justify="left", caption=caption)
    table.add_column("model", overflow="fold")
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("perplexity", justify="right", no_wrap=True)
    table.add_column("exact match", justify="right", no_wrap=True)
    table.add_column("contains", justify="right", no_wrap=True)
    preference = any(m.prefers_chosen is not None for m in report.models)
    if preference:
        table.add_column("prefers chosen", justify="right", no_wrap=True)
        table.add_column("reward acc.", justify="right", no_wrap=True)
        table.add_column("reward margin", justify="right", no_wrap=True)
    for m in report.models:
        b = base if base is not None and m is not base else None
        table.add_row(
            m.name,
            f"{m.loss:.4f}" + _delta(m.loss, b and b.loss, True, False),
            f"{m.perplexity:.4g}",
            _pct(m.exact_match) + _delta(m.exact_match, b and b.exact_match, False, True),
            _pct(m.contains) + _delta(m.contains, b and b.contains, False, True),
            *(
                [
                    _pct(m.prefers_chosen) + _delta(m.prefers_chosen, b and b.prefers_chosen, False, True),
                    _pct(m.reward_accuracy),
                    "-" if m.reward_margin is None else f"{m.reward_margin:+.3f}",
                ]
                if preference
                else []
            ),
        )
    return table


def samples_table(report: EvalReport, n: int) -> Any:
    """The first ``n`` examples that have a reference: prompt, reference and each model's answer."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="samples", title_justify="left", show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("prompt")
    table.add_column("reference")
    for m in report.models:
        table.add_column(m.name)
    shown = 0
    for i, ref in enumerate(report.references):
        if ref is None or shown >= n:
            continue
        prompt = report.prompts[i]
        if len(prompt) > 300:
            prompt = "…" + prompt[-300:]
        answers = [Text(repr(m.predictions[i]) if m.predictions[i] is not None else "-") for m in report.models]
        table.add_row(str(i), Text(prompt), Text(repr(ref)), *answers)
        shown += 1
    return table


def check_json_path(path: str | Path) -> Path:
    out = Path(path).expanduser()
    if out.is_dir():
        raise ConfigError(f"--json {path} is a folder; give a file path")
    if not out.parent.is_dir():
        raise ConfigError(f"--json {path}: folder {out.parent} does not exist")
    return out


def write_json(path: str | Path, report: EvalReport) -> None:
    """Write the results atomically (temp file + rename): a crash never leaves half a file."""
    out = check_json_path(path)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_eval(
    inputs: list[str | Path],
    options: EvalOptions,
    *,
    json_path: str | Path | None = None,
    samples: int = 0,
    console: Any = None,
    log: Any = None,
) -> EvalReport:
    """``qlora eval``: evaluate, print the table (and samples) on ``console``, write ``--json``."""
    from rich.console import Console

    console = console or Console(soft_wrap=True)
    if json_path is not None:
        check_json_path(json_path)  # a bad --json path fails before minutes of scoring
    report = evaluate(inputs, options, log)
    console.print(results_table(report))
    if samples > 0:
        if any(r is not None for r in report.references):
            console.print(samples_table(report, samples))
        else:
            console.print("no samples to show: the eval data has no reference answers (text rows)")
    if json_path is not None:
        write_json(json_path, report)
        refresh_model_cards(report)
    return report


def refresh_model_cards(report: EvalReport) -> None:
    """Rewrite the model card of each run folder scored (not checkpoints or bare adapters) with these scores."""
    from qlora_cli.layout import CONFIG_FILE, METRICS_FILE
    from qlora_cli.model_card import write_model_card

    base = [m.to_json() for m in report.models if m.name == "base" and m.path is None]
    for m in report.models:
        if m.path is not None and (m.path / CONFIG_FILE).exists() and (m.path / METRICS_FILE).exists():
            write_model_card(m.path, evaluation={"source": report.source, "models": [*base, m.to_json()]})
