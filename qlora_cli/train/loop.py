"""The training loop, readable top to bottom.

    config -> tokenizer -> data -> 4-bit base -> LoRA -> optimizer/schedule -> loop -> adapter on disk

Everything that can be wrong with the user's input (config, data, model folder, targets) is checked
before the output folder is touched, so a mistake leaves nothing half-written.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qlora_cli.config import RunConfig, dump_config
from qlora_cli.data.chat_templates import marker_warning
from qlora_cli.data.examples import DataStats
from qlora_cli.data.pipeline import (
    Example,
    TrainData,
    build_datasets,
    build_eval_only,
    check_not_degenerate,
    draw_mixture,
    epoch_batches,
    pack_examples,
)
from qlora_cli.data.stream import StreamData, scan
from qlora_cli.errors import ConfigError, ModelError, QLoRAError
from qlora_cli.kernels.compile import compile_layers
from qlora_cli.kernels.liger import apply_liger
from qlora_cli.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BEST_DIR,
    CARD_FILE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    TENSORBOARD_DIR,
    TRACKERS_FILE,
)
from qlora_cli.model.adapter_io import load_start_adapter, save_adapter
from qlora_cli.model.loading import (
    check_base_model,
    enable_gradient_checkpointing,
    load_base_model,
    load_tokenizer,
    quiet_libraries,
    resolve_device,
)
from qlora_cli.model.lora import AroundLinear, freeze_reference, inject_lora, lora_parameters, set_fused
from qlora_cli.model.starts import apply_start, original_weights
from qlora_cli.model.token_rows import resize_for, row_parameters, token_ids, train_copies, train_rows
from qlora_cli.model_card import write_model_card
from qlora_cli.plot import write_loss_plot
from qlora_cli.run_folder import is_run_folder, read_metrics
from qlora_cli.train.checkpoint import (
    Checkpoint,
    TrainerState,
    find_checkpoint,
    list_checkpoints,
    read_checkpoint,
    restore_adapter,
    restore_training,
    save_best_adapter,
    save_checkpoint,
)
from qlora_cli.train.log import MetricsLog, ProgressDisplay, StopSignals, report_start
from qlora_cli.train.loss import EvalResult, evaluate_loss
from qlora_cli.train.preference import (
    Objective,
    Sums,
    accumulate_preferences,
    evaluate_preferences,
    precompute_reference,
    step_counts,
)
from qlora_cli.train.sharding import from_main, fsdp2, full_adapter, local
from qlora_cli.train.step import Precision, accumulate_gradients, clip_gradients, idle_backward
from qlora_cli.train.trackers import Reporter, check_trackers, start_trackers


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float  # token-weighted mean over the last logging window
    eval_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: str | None = None  # why early stopping ended the run, if it did


# ---------------------------------------------------------------------------------------------
# setup helpers


def check_output_dir(path: str, force: bool = False, resume: str | None = None) -> Path:
    """Refuse to mix a new run into an old one, or to write into a folder that is not a run's; nothing is created.

    A missing or empty folder is always fine (``--resume`` then starts a new run, saying so). A non-empty folder is
    written into only when it is a qlora run folder (``is_run_folder``): replaced with ``force``, or continued with
    ``resume`` (``auto``, or a checkpoint of that same run). Any other folder, ``/`` or a project folder, never.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {path} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not is_run_folder(out):
        what = "--force replaces" if force else "resuming continues" if resume else None
        if what is None:
            raise ConfigError(f"output_dir {path} exists and is not empty (use --force to overwrite)")
        raise ConfigError(
            f"output_dir {path} is not empty and is not a qlora run folder (qlora train did not write it: no "
            f"{CONFIG_FILE} and {METRICS_FILE} of a run); {what} only a run folder: choose another output_dir"
        )
    named = Path(resume).expanduser() if resume not in (None, "auto") else None
    if named is not None and named.exists() and not _inside(named, out / CHECKPOINTS_DIR):  # (missing: said later)
        raise ConfigError(
            f"resume_from_checkpoint {resume} is not a checkpoint of the run in output_dir {path}; resume another "
            "run's checkpoint into a new, empty output_dir"
        )
    if not force and not resume:
        raise ConfigError(f"output_dir {path} exists and is not empty (use --force to overwrite)")
    return out


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def nothing_to_resume(out: Path) -> ConfigError:
    """The error for ``--resume`` on a run folder without a usable checkpoint: a finished run says so."""
    summary = next((r for r in reversed(read_metrics(out)) if r["type"] == "summary"), None)
    if summary is not None:
        return ConfigError(
            f"--resume: {out} is a run that finished at step {summary.get('steps')} and has no checkpoint to resume "
            "from; its adapter is left as it is (train into a new output_dir, or replace the run with --force)"
        )
    return ConfigError(
        f"--resume: {out} has no complete checkpoint to resume from (save_steps writes them); "
        "start it again with --force, or train into a new output_dir"
    )


def clear_previous_run(out: Path) -> None:
    """``--force`` over a run folder: remove what the earlier run left that a new one would not overwrite and a
    later command would read as this run's (its checkpoints, ``best/``, adapter, card, plot, trackers' ids and
    TensorBoard logs). Only called on a folder ``is_run_folder`` accepted; files qlora does not write stay."""
    for name in (CHECKPOINTS_DIR, BEST_DIR, TENSORBOARD_DIR):
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
    for name in (
        ADAPTER_WEIGHTS,
        ADAPTER_CONFIG,
        TRACKERS_FILE,
        CARD_FILE,
        PLOT_FILE,
        f".{BEST_DIR}.tmp",
        f".{BEST_DIR}.old",
    ):
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer over adapter parameters only. bitsandbytes' paged optimizers page state to CPU under
    memory pressure on CUDA; elsewhere they behave as the unpaged ones."""
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999), "eps": 1e-8}
    if cfg.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"optimizer {cfg.optimizer} needs bitsandbytes; install it or use adamw_torch") from None
    optimizers = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return optimizers[cfg.optimizer](params, **kwargs)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """transformers' schedules (``get_scheduler``: cosine, linear, constant_with_warmup), the same multipliers at
    every step, without importing ``transformers.optimization``, which imports ``trainer_utils`` and with it peft
    (0.3-2.5 s before the first step)."""
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, partial(lr_multiplier, cfg.lr_scheduler, cfg.warmup_steps, total_steps))


def lr_multiplier(kind: str, warmup: int, total: int, step: int) -> float:
    """The learning rate's factor at ``step``: a linear warm-up over ``warmup`` steps, then cosine to 0 (half a
    cycle), linear to 0, or constant, over the ``total`` steps."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # half a cycle


def steps_per_epoch(n_examples: int, micro_batch_size: int, accumulation: int, num_processes: int = 1) -> int:
    micro_batches = math.ceil(n_examples / micro_batch_size)
    return math.ceil(micro_batches / (accumulation * num_processes))


def total_steps(cfg: RunConfig, n_examples: int, num_processes: int = 1) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = steps_per_epoch(n_examples, cfg.micro_batch_size, cfg.gradient_accumulation_steps, num_processes)
    return max(1, math.ceil(per_epoch * cfg.num_epochs))


def check_packing_isolation(model: Any, device: torch.device, vocab_size: int, precision: Precision) -> None:
    """Refuse sample packing when the model's attention does not keep packed examples apart.

    Packing relies on transformers building a block-diagonal causal mask from restarting position ids;
    an attention implementation that ignores them would silently let examples attend to each other.
    The model runs as training runs it (``precision``'s autocast): a bare bf16 forward fails on float32 norms.
    """
    tolerance = 1e-4 if precision.dtype == torch.float32 else 5e-2
    g = torch.Generator().manual_seed(0)
    a = torch.randint(3, vocab_size, (1, 7), generator=g)
    b = torch.randint(3, vocab_size, (1, 5), generator=g)
    packed = torch.cat([a, b], dim=1).to(device)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
    with torch.no_grad(), precision.autocast():
        together = model(input_ids=packed, position_ids=positions).logits[0, 7:].float()
        alone = model(input_ids=b.to(device)).logits[0].float()
    if not torch.allclose(together, alone, atol=tolerance, rtol=0):
        name = type(model).__name__
        impl = getattr(model.config, "_attn_implementation", None)
        raise ConfigError(
            f"sample_packing: {name} with attn_implementation={impl} lets packed examples attend to each other "
            f"(max logit difference {(together - alone).abs().max():.3g}); set sample_packing: false"
        )


# ---------------------------------------------------------------------------------------------
# the run: setup -> (train_step, evaluate, checkpoint)* -> save


@dataclass
class Run:
    """What ``setup`` builds: everything the loop, ``evaluate`` and ``save`` use."""

    cfg: RunConfig
    accelerator: Any
    console: Console
    out: Path
    tokenizer: Any
    data: TrainData
    rows: list[list[Example]]  # one example each, or one pack each with sample packing (empty when streaming)
    model: Any  # the plain model with its LoRA layers: what is saved
    trained: Any  # what runs forward and backward: the model, or its DDP/FSDP wrapper
    fsdp: bool
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    steps: int
    state: TrainerState
    resumed_from: Path | None
    replace_run: bool = False  # --force over a run folder: start() clears what the old run left
    metrics: MetricsLog | None = None  # once ``start`` has created the output folder
    reporter: Reporter | None = None  # the experiment trackers, when report_to names any
    started: float = field(default_factory=time.perf_counter)
    stream: StreamData | None = None  # streaming: the training data, read a block at a time
    first_step_at: float | None = None  # wall-clock times (time.time()) of this run's first step and its last:
    last_step_at: float | None = None  # what comes before and after them is the run's fixed overhead

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def pad_multiple(self) -> int:
        return 8 if self.device.type == "cuda" else 1


def run_train(cfg: RunConfig, *, force: bool = False, console: Console | None = None) -> TrainResult:
    """Fine-tune ``cfg.base_model`` with LoRA and write the adapter to ``cfg.output_dir``.

    Under ``accelerate launch`` each process trains on its own share of every step's micro-batches;
    gradients are averaged by DDP and only the main process writes.
    """
    run = setup(cfg, force=force, console=console)
    start(run)
    state, steps = run.state, run.steps
    window_log = _LogWindow()
    last_eval, stopped = None, None  # stopped: why early stopping ended the run
    with ProgressDisplay(run.console, steps, state.step) as progress, StopSignals() as stop:
        while state.step < steps and stopped is None:
            for window, advance in next_windows(run):  # optimizer steps, each a list of micro-batches
                if state.step >= steps or stopped is not None:
                    break
                if run.first_step_at is None:
                    run.first_step_at = time.time()
                grad_norm, n_tokens = train_step(run, window)
                run.last_step_at = time.time()
                advance()  # the data position of the next step (a new epoch reshuffles)
                window_log.tokens += n_tokens
                if state.step % cfg.logging_steps == 0 or state.step == steps:
                    progress.update(state.step, window_log.record(run, grad_norm))
                else:
                    progress.update(state.step, None)
                if cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < steps:
                    last_eval = evaluate(run)
                    stopped = track_best(run, last_eval)
                if cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < steps:
                    checkpoint(run)
                if _any_process(run.accelerator, stop.signal is not None):
                    raise TrainingInterrupted(
                        f"{stop.name or 'signal'} at step {state.step}: checkpoint saved to {checkpoint(run)}; "
                        "continue with `qlora train <config> --resume`",
                        exit_code=143 if stop.name == "SIGTERM" else 130,
                    )
    if stopped is None:
        last_eval = evaluate(run)
        track_best(run, last_eval)
    else:
        run.console.print(f"step {state.step}: stopping early: {stopped}")
    check_trained(run, last_eval)
    return save(run, last_eval, window_log.last_loss, stopped)


def setup(cfg: RunConfig, *, force: bool = False, console: Console | None = None) -> Run:
    """Validate everything and load everything (tokenizer, data, 4-bit base, LoRA, optimizer, schedule, a
    checkpoint to resume from); nothing is written."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    quiet_libraries()
    resolve_device(cfg.device)  # a clear error when CUDA is asked for and missing
    check_trackers(cfg.report_to)  # a tracker that is not installed: an error before anything loads
    accelerator = Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    if _is_fsdp(accelerator):  # accelerate's FSDP plugin would wrap the model its own way
        raise ConfigError(
            "an accelerate FSDP config: qlora shards with FSDP2 itself; set fsdp: true in the qlora config and "
            "launch with `accelerate launch --multi_gpu --num_processes N` (or torchrun)"
        )
    if _is_deepspeed(accelerator):  # its engine would take over the optimizer, the 4-bit base and the loop
        raise ConfigError(
            "an accelerate DeepSpeed config: qlora does not run under DeepSpeed; for sharding set fsdp: true in "
            "the qlora config and launch with `accelerate launch --multi_gpu --num_processes N` (or torchrun)"
        )
    device = accelerator.device
    console = (console or Console(stderr=True, soft_wrap=True)) if accelerator.is_main_process else Console(quiet=True)
    precision = Precision.for_run(cfg.bnb_4bit_compute_dtype, device)
    # the main process alone looks at the run folder (the other nodes of a job may have no copy of it) and
    # reads the checkpoint, which reaches the others whole
    out, fresh, checkpoint_read = from_main(accelerator, lambda: _run_folder(cfg, force, console, accelerator))
    resume_from = checkpoint_read.path if checkpoint_read is not None else None
    replace_run = force and resume_from is None and not fresh  # check_output_dir found a run folder there
    check_base_model(cfg)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    stream = None
    if cfg.streaming:  # the training files are read a block at a time as the steps need them
        data = build_eval_only(cfg.data, tokenizer)
        stream = StreamData(
            cfg.datasets, tokenizer, cfg.data, cfg.stream_block_rows, cfg.sample_packing, cfg.micro_batch_size,
            cfg.gradient_accumulation_steps * accelerator.num_processes,
        )  # fmt: skip
        streamed_rows = scan(cfg.datasets)  # every line parsed once: a bad one is an error before anything starts
        first = stream.first_examples()
        if not cfg.allow_degenerate_data:
            check_not_degenerate(first, tokenizer)
        data.train_stats = DataStats(rows=len(first), examples=len(first))
    else:
        data = build_datasets(cfg.data, tokenizer)
    if any(spec.type in ("chat", "sharegpt", "preference", "unpaired") for spec in cfg.datasets):
        warning = marker_warning(cfg.chat_template, tokenizer)
        if warning:
            console.print(f"[yellow]warning:[/yellow] {warning}")
    model = load_base_model(cfg, device)
    rows_before = model.get_input_embeddings().num_embeddings
    if cfg.trains_rows:
        resize_for(model, len(tokenizer))  # room for the added tokens (a padded vocabulary may have it already)
    target_names = inject_lora(model, cfg.lora)  # after set_seed: the adapter init is reproducible
    if cfg.init_lora_weights not in ("default", "gaussian"):  # data-dependent starts: LoftQ, PiSSA, OLoRA
        apply_start(model, cfg.lora, original_weights(cfg.base) if cfg.init_lora_weights == "loftq" else None)
    copied = train_copies(model, cfg.modules_to_save) if cfg.modules_to_save else []
    if cfg.trains_rows and copied:  # the new rows train inside the full copies
        if len(copied) < (1 if model.get_output_embeddings() is None else 2):
            raise ModelError(
                "new tokens with modules_to_save: list both the embedding and the output head, so that the new "
                "rows train in each (or leave modules_to_save out: the new rows alone train)"
            )
    elif cfg.trains_rows:  # the listed tokens' embedding (and head) rows train; fresh ones start at the mean row
        ids = list(dict.fromkeys(token_ids(tokenizer, cfg.trained_tokens(tokenizer.qlora_new_tokens))))
        ids = list(dict.fromkeys(ids + cfg.trainable_token_indices))
        if ids:  # a role given to a token the tokenizer has (special_tokens: {pad_token: ...}) trains nothing
            train_rows(model, ids, set(token_ids(tokenizer, tokenizer.qlora_new_tokens)), rows_before)
    if cfg.ref_adapter:  # preference tuning on top of an earlier run: its adapter is the start and the reference
        load_start_adapter(model, cfg.ref_adapter, cfg.lora, "ref_adapter")
    if cfg.preference and cfg.ref_adapter:
        freeze_reference(model)
    set_fused(model, cfg.fused_lora, norms=not cfg.torch_compile)  # compiling fuses the norms itself
    liger = apply_liger(model, cfg.liger_kernels)
    compiled = (
        compile_layers(
            model,
            device,
            lambda m: console.print(f"[yellow]warning:[/yellow] {m}"),
            lambda m: isinstance(m, AroundLinear) or getattr(m, "_qlora_fused_mlp", False),
        )
        if cfg.torch_compile
        else 0
    )
    if cfg.sample_packing:
        check_packing_isolation(model, device, len(tokenizer), precision)
    rows = training_rows(data.train, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.gradient_checkpointing == "offload", cfg.checkpoint_every_n_layers)
    model.train()
    fsdp = cfg.fsdp and accelerator.num_processes > 1
    if checkpoint_read is not None:  # into the plain model, before DDP or FSDP takes it
        restore_adapter(checkpoint_read, cfg, model)
    trained = _wrap_for_processes(model, accelerator, fsdp)  # DDP/FSDP when world > 1; `model` is the module
    # FSDP2 shards the parameters in place (DTensors): the optimizer takes them as they are after wrapping
    params = (
        [p for p in trained.parameters() if p.requires_grad] if fsdp else lora_parameters(model) + row_parameters(model)
    )
    optimizer = build_optimizer(cfg, params)
    steps = total_steps(cfg, len(rows), accelerator.num_processes)
    scheduler = build_scheduler(cfg, optimizer, steps)
    state = TrainerState()
    if checkpoint_read is not None:
        state = restore_training(checkpoint_read, optimizer, scheduler, accelerator.process_index, fsdp)
        checkpoint_read = None  # its tensors are in place: let them go
    report_start(console, cfg, data, model, target_names, params, steps, device, accelerator.num_processes, rows)
    if stream is not None:
        console.print(
            f"data: streaming {streamed_rows:,} rows from {len(cfg.datasets)} file(s) in blocks of "
            f"{cfg.stream_block_rows:,} rows (the first: {len(first):,} examples, "
            f"{sum(e.n_targets for e in first):,} targets), {len(data.eval)} eval"
        )
    if cfg.preference and cfg.precompute_ref_log_probs:
        console.print(f"reference log-probabilities: computing for {len(data.train) + len(data.eval)} examples")
        for part in (data.train, data.eval):
            precompute_reference(
                model,
                part,
                cfg.eval_micro_batch_size,
                device,
                tokenizer.pad_token_id,
                precision.autocast,
                cfg.fused_cross_entropy,
            )
    if compiled:
        console.print(f"torch.compile: {compiled} decoder layers (compiled at the first steps)")
    if liger:
        console.print("Liger kernels: RMSNorm, RoPE, SwiGLU")
    if resume_from is not None:
        console.print(f"resuming from {resume_from} at step {state.step}")
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        console=console,
        out=out,
        tokenizer=tokenizer,
        data=data,
        rows=rows,
        model=model,
        trained=trained,
        fsdp=fsdp,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        precision=precision,
        steps=steps,
        state=state,
        resumed_from=resume_from,
        replace_run=replace_run,
        stream=stream,
    )


def _run_folder(
    cfg: RunConfig, force: bool, console: Console, accelerator: Any
) -> tuple[Path, bool, Checkpoint | None]:
    """(output folder, whether it is new or empty, the checkpoint to resume from as read), on the main process."""
    out = check_output_dir(cfg.output_dir, force, cfg.resume_from_checkpoint)
    fresh = not out.exists() or not any(out.iterdir())
    resume_from = None
    if cfg.resume_from_checkpoint == "auto" and fresh:
        console.print(f"--resume: nothing to resume in {out} yet; starting a new run")
    elif cfg.resume_from_checkpoint:
        resume_from = find_checkpoint(out, cfg.resume_from_checkpoint, console.print)
        if resume_from is None:
            raise nothing_to_resume(out)
    checkpoint_read = read_checkpoint(resume_from, cfg, accelerator.num_processes) if resume_from else None
    return out, fresh, checkpoint_read


def start(run: Run) -> None:
    """From here on we write (the main process only): the output folder, the config, the metrics log."""
    run.accelerator.wait_for_everyone()  # every process has validated before anything is created
    main = run.accelerator.is_main_process
    created = main and not run.out.exists()
    if main and run.replace_run:  # --force over a run folder, as check_output_dir found it: the new run replaces it
        clear_previous_run(run.out)
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / CONFIG_FILE).write_text(dump_config(run.cfg))
    keep = run.state.step if run.resumed_from is not None else None
    run.metrics = MetricsLog(run.out / METRICS_FILE, keep, enabled=main)
    try:
        run.reporter = start_trackers(run.accelerator, run.cfg, run.out, keep, run.metrics.logged_through)
    except ConfigError:  # a tracker refused to start (its store, login, network): a new run leaves nothing
        if created:
            shutil.rmtree(run.out, ignore_errors=True)
        raise
    if run.reporter is not None:
        run.metrics.report = run.reporter.report
    run.started = time.perf_counter()


def next_windows(run: Run) -> Iterator[tuple[list[list[list[Example]]], Callable[[], None]]]:
    """The optimizer steps from the current data position: the rest of this epoch (a streamed run: on and on),
    each with what moves the position past it once trained."""
    state = run.state
    if run.stream is None:
        windows = epoch_windows(run)
        for k in range(state.window, len(windows)):

            def advance(last: bool = k + 1 == len(windows)) -> None:
                if last:  # train_step counted the window; the epoch is done: the next step reshuffles
                    state.epoch, state.window = state.epoch + 1, 0

            yield windows[k], advance
        return
    for window, epoch, position in run.stream.windows(state.epoch, tuple(state.stream), run.cfg.seed):
        if epoch != state.epoch:  # the files ended: this step is the next epoch's first
            state.epoch, state.window = epoch, 0

        def advance(position: tuple[int, ...] = position) -> None:
            state.stream = list(position)

        yield window, advance


def epoch_windows(run: Run) -> list[list[list[list[Example]]]]:
    """The current epoch's optimizer steps: each a list of micro-batches (accumulation x processes of them),
    each a list of rows, shuffled by the epoch's seed."""
    cfg, rows = run.cfg, run.rows
    if run.data.pools is not None and run.state.epoch > 0:  # a weighted mixture draws anew each epoch
        drawn, _ = draw_mixture(run.data.pools, cfg.seed, run.state.epoch)
        rows = training_rows(drawn, cfg)
    batches = epoch_batches(len(rows), cfg.micro_batch_size, cfg.seed, run.state.epoch)
    windows = _windows(batches, cfg.gradient_accumulation_steps * run.world)
    return [[[rows[i] for i in idx] for idx in window] for window in windows]


def training_rows(examples: list[Example], cfg: RunConfig) -> list[list[Example]]:
    """What a micro-batch holds: packs of examples up to sequence_len, or one example each."""
    if cfg.sample_packing:
        return [[examples[i] for i in pack] for pack in pack_examples(examples, cfg.sequence_len)]
    return [[e] for e in examples]


def train_step(run: Run, window: list[list[list[Example]]]) -> tuple[float, int]:
    """One optimizer step over ``window``; this process takes its consecutive share of the micro-batches.
    A non-finite loss or gradient norm skips the update (the data position and schedule still move) and
    too many of them stop the run (``diverged``). Returns (gradient norm, real tokens on every process)."""
    cfg, state, precision = run.cfg, run.state, run.precision
    accumulation = cfg.gradient_accumulation_steps
    n_targets = sum(e.n_targets for mb in window for row in mb for e in row)
    first = run.rank * accumulation
    share = window[first : first + accumulation]
    prefs = None  # preference tuning: the step's Sums
    if cfg.preference:
        objective = Objective.from_config(cfg)
        n_items, n_nll = step_counts(objective, [row for mb in window for row in mb])
        if share:
            seeds = [_micro_batch_seed(cfg.seed, state.epoch, state.window, first + j) for j in range(len(share))]
            prefs, n_tokens = accumulate_preferences(
                run.trained,
                share,
                objective,
                device=run.device,
                precision=precision,
                pad_id=run.tokenizer.pad_token_id,
                pad_multiple=run.pad_multiple,
                fused=cfg.fused_cross_entropy,
                n_items=n_items,
                n_tokens=n_nll,
                world_size=run.world,
                seeds=seeds,
                no_sync=run.accelerator.no_sync,
            )
        else:
            idle_backward(run.trained, window[0][0], run.tokenizer.pad_token_id, run.device, precision)
            prefs, n_tokens = Sums(), 0
        if run.world > 1:
            keys = sorted(prefs.values)
            values = torch.tensor([prefs.values[k] for k in keys] + [n_tokens], device=run.device, dtype=torch.float64)
            values = run.accelerator.reduce(values, "sum")
            prefs = Sums(dict(zip(keys, values[:-1].tolist())))
            n_tokens = int(values[-1])
        step_loss = prefs.loss()
    elif share:
        seeds = [_micro_batch_seed(cfg.seed, state.epoch, state.window, first + j) for j in range(len(share))]
        step_loss, _, n_tokens = accumulate_gradients(
            run.trained,
            share,
            device=run.device,
            precision=precision,
            pad_id=run.tokenizer.pad_token_id,
            pad_multiple=run.pad_multiple,
            packed=cfg.sample_packing,
            fused_cross_entropy=cfg.fused_cross_entropy,
            n_targets=n_targets,
            world_size=run.world,
            seeds=seeds,
            no_sync=run.accelerator.no_sync,
        )
    else:
        idle_backward(run.trained, window[0][0], run.tokenizer.pad_token_id, run.device, precision)
        step_loss, n_tokens = 0.0, 0
    if prefs is None and run.world > 1:
        totals = run.accelerator.reduce(
            torch.tensor([step_loss, n_tokens], device=run.device, dtype=torch.float64), "sum"
        )
        step_loss, n_tokens = float(totals[0]), int(totals[1])
    precision.unscale(run.optimizer)
    grad_norm = clip_gradients(run.params, cfg.max_grad_norm)
    if math.isfinite(step_loss) and math.isfinite(grad_norm):
        precision.step(run.optimizer)
        state.consecutive_bad = 0
        if prefs is not None:
            for key, value in prefs.values.items():
                state.log_prefs[key] = state.log_prefs.get(key, 0.0) + value
            state.log_prefs["steps"] = state.log_prefs.get("steps", 0.0) + 1
        else:
            state.log_loss += step_loss
            state.log_targets += n_targets
    elif precision.scaler is not None and math.isfinite(step_loss) and precision.scaler.get_scale() > 1.0:
        # fp16 gradients overflowed at this loss scale: the scaler skips the update and lowers the scale, as
        # loss scaling is meant to (its first steps often do); not a sign of divergence until the scale is spent
        precision.step(run.optimizer)
        run.console.print(f"step {state.step + 1}: fp16 gradients overflowed, loss scale lowered, update skipped")
    else:  # skip the update, keep the data position and schedule moving
        if precision.scaler is not None:  # unscale_ ran: end the scaler's step without an optimizer step (a
            precision.scaler.update()  # non-finite loss can come with finite gradients, which step() would apply)
        state.bad_steps += 1
        state.consecutive_bad += 1
        run.console.print(f"step {state.step + 1}: non-finite loss or gradient norm, update skipped")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.window += 1
    stop = diverged(state.step, state.bad_steps, state.consecutive_bad, cfg.max_bad_steps, cfg.max_bad_fraction)
    if stop:
        run.metrics.log({"type": "error", "step": state.step, "bad_steps": state.bad_steps})
        raise TrainingDiverged(
            f"stopped at step {state.step}: {stop}; lower learning_rate or check the data; no adapter was written"
            f"{_checkpoint_note(run)}"
        )
    return grad_norm, n_tokens


def diverged(step: int, bad: int, consecutive: int, max_consecutive: int, max_fraction: float) -> str | None:
    """Why the run must stop, or None: ``max_consecutive`` non-finite steps in a row, or more than ``max_fraction``
    of the steps so far (judged from the third bad step on, so one early spike does not end a short run)."""
    if consecutive >= max_consecutive:
        return (
            f"{consecutive} consecutive steps had a non-finite loss or gradient norm (max_bad_steps={max_consecutive})"
        )
    if bad >= MIN_BAD_FOR_FRACTION and bad > max_fraction * step:
        return (
            f"{bad} of {step} steps had a non-finite loss or gradient norm and were skipped "
            f"(more than max_bad_fraction={max_fraction:g} of them)"
        )
    return None


MIN_BAD_FOR_FRACTION = 3


def evaluate(run: Run) -> EvalResult | None:
    """The eval loss at the current step, logged; each process scores its share and the sums are combined."""
    if not run.data.eval:
        return None
    cfg, step = run.cfg, run.state.step
    mine = run.data.eval[run.rank :: run.world]
    batch_size = cfg.eval_micro_batch_size
    pad_id = run.tokenizer.pad_token_id
    if cfg.preference:
        return _evaluate_preferences(run, mine)
    local = (
        evaluate_loss(
            run.trained, mine, batch_size, pad_id, run.device, run.precision.autocast, cfg.fused_cross_entropy
        )
        if mine
        else None
    )
    sums = torch.tensor([local.loss * local.n_tokens, local.n_tokens] if local else [0.0, 0.0], device=run.device)
    sums = run.accelerator.reduce(sums, "sum") if run.world > 1 else sums
    result = EvalResult(float(sums[0] / sums[1].clamp(min=1)), int(sums[1]))
    run.metrics.log(
        {
            "type": "eval",
            "step": step,
            "eval_loss": result.loss,
            "eval_ppl": result.perplexity,
            "eval_tokens": result.n_tokens,
        }
    )
    run.console.print(f"step {step}: eval_loss {result.loss:.4f}  ppl {result.perplexity:.2f}")
    return result


def _evaluate_preferences(run: Run, mine: list[Example]) -> EvalResult:
    """Preference tuning's eval: the loss and rewards over the eval pairs (``eval_loss`` is what early stopping
    and ``best/`` follow)."""
    cfg = run.cfg
    sums = (
        evaluate_preferences(
            run.trained,
            mine,
            Objective.from_config(cfg),
            cfg.eval_micro_batch_size,
            run.device,
            run.tokenizer.pad_token_id,
            run.precision.autocast,
            cfg.fused_cross_entropy,
        )
        if mine
        else Sums()
    )
    if run.world > 1:
        keys = sorted(sums.values)
        values = run.accelerator.reduce(
            torch.tensor([sums.values[k] for k in keys], device=run.device, dtype=torch.float64), "sum"
        )
        sums = Sums(dict(zip(keys, values.tolist())))
    means = sums.means("eval_")
    result = EvalResult(means["eval_loss"], int(sums.values["items"]))
    run.metrics.log({"type": "eval", "step": run.state.step, **means, "eval_examples": result.n_tokens})
    shown = "  ".join(f"{k[5:]} {v:.4f}" for k, v in means.items() if k != "eval_loss")
    run.console.print(f"step {run.state.step}: eval_loss {result.loss:.4f}  {shown}")
    return result


def track_best(run: Run, result: EvalResult | None) -> str | None:
    """Early stopping and ``save_best`` bookkeeping after an eval: a new best (lower than the best by more
    than ``early_stopping_threshold``) is kept as ``best/``; returns why to stop, or None to go on."""
    cfg, state = run.cfg, run.state
    if result is None or not (cfg.early_stopping_patience or cfg.save_best):
        return None
    best = state.best_eval_loss
    if best is None or result.loss < best - cfg.early_stopping_threshold:
        state.best_eval_loss, state.best_step, state.evals_since_best = result.loss, state.step, 0
        if cfg.save_best:
            with full_adapter(run.trained, run.fsdp):
                if run.accelerator.is_main_process:
                    save_best_adapter(run.out, cfg, run.model, state.step, result.loss)
            run.accelerator.wait_for_everyone()
        return None
    state.evals_since_best += 1
    if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
        return (
            f"eval_loss has not improved on {best:.4f} (step {state.best_step}) by more than "
            f"{cfg.early_stopping_threshold:g} in {state.evals_since_best} evals (early_stopping_patience="
            f"{cfg.early_stopping_patience})"
        )
    return None


def checkpoint(run: Run) -> Path:
    """An atomic checkpoint of the adapter, optimizer, schedule, RNG and position (``checkpoint.py``)."""
    path = save_checkpoint(
        run.out, run.cfg, run.model, run.optimizer, run.scheduler, run.state, run.accelerator, run.trained, run.fsdp
    )
    run.console.print(f"step {run.state.step}: checkpoint saved to {path}")
    return path


def check_trained(run: Run, eval_result: EvalResult | None) -> None:
    """Refuse to write an adapter that is not finite, or whose final eval loss is not: a run that trained on
    nonsense must not end "done"."""
    # each process checks what it holds (under FSDP its shards); any one finding a bad value stops them all
    bad = [n for n, p in run.trained.named_parameters() if p.requires_grad and not torch.isfinite(local(p)).all()]
    problem = None
    if _any_process(run.accelerator, bool(bad)):
        where = f" ({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})" if bad else ""
        problem = f"the adapter has non-finite values{where}"
    elif eval_result is not None and not math.isfinite(eval_result.loss):
        problem = f"the final eval loss is {eval_result.loss}"
    if problem:
        run.metrics.log({"type": "error", "step": run.state.step, "bad_steps": run.state.bad_steps})
        raise TrainingDiverged(
            f"stopped at step {run.state.step}: {problem}; no adapter was written{_checkpoint_note(run)}"
        )


def _checkpoint_note(run: Run) -> str:
    steps = [s for s, _, ok in list_checkpoints(run.out) if ok]
    return f" and the last checkpoint (step {steps[-1]}) is intact" if steps else ""


def save(run: Run, eval_result: EvalResult | None, train_loss: float, stopped: str | None = None) -> TrainResult:
    """Write the adapter and tokenizer (the main process; FSDP gathers the sharded adapter) and the summary."""
    cfg, state = run.cfg, run.state
    run.model.eval()
    with full_adapter(run.trained, run.fsdp):
        if run.accelerator.is_main_process:
            save_adapter(run.model, run.out, cfg.lora, cfg.base_model)
            run.tokenizer.save_pretrained(run.out)
    run.accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - run.started
    eval_loss = eval_result.loss if eval_result else None
    run.metrics.log(
        {
            "type": "summary",
            "steps": state.step,
            "train_loss": train_loss,
            "eval_loss": eval_loss,
            "bad_steps": state.bad_steps,
            "best_eval_loss": state.best_eval_loss,
            "best_step": state.best_step,
            "stopped_early": stopped,
            "train_examples": None if run.stream else len(run.data.train),  # a stream is not counted up front
            "train_target_tokens": None if run.stream else run.data.train_stats.target_tokens,
            "processes": run.world,
            "elapsed_sec": elapsed,
            "first_step_at": run.first_step_at,
            "last_step_at": run.last_step_at,
        }
    )
    if run.reporter is not None:
        run.reporter.finish()
    if run.accelerator.is_main_process:
        write_loss_plot(run.out, run.console)
        write_model_card(run.out, cfg)
    run.console.print(f"[green]done[/green]: {state.step} steps in {elapsed:.1f}s; adapter written to {run.out}")
    return TrainResult(run.out, state.step, train_loss, eval_loss, run.metrics.history, stopped)


@dataclass
class _LogWindow:
    """Tokens and time since the last train log line; the loss is the token-weighted mean over that window."""

    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_loss: float = float("nan")

    def record(self, run: Run, grad_norm: float) -> dict[str, Any]:
        state = run.state
        elapsed = time.perf_counter() - self.started
        extra: dict[str, float] = {}
        if run.cfg.preference:  # the window's pairs weigh alike: mean loss and rewards over them
            sums = Sums({k: v for k, v in state.log_prefs.items() if k != "steps"})
            extra = sums.means() if state.log_prefs.get("steps") else {"loss": float("nan")}
            self.last_loss = extra.pop("loss")
            state.log_prefs = {}
        else:
            self.last_loss = state.log_loss / state.log_targets if state.log_targets else float("nan")
        record = {
            "type": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": self.last_loss,
            **extra,
            "lr": run.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_sec": self.tokens / max(elapsed, 1e-9),
            "elapsed_sec": time.perf_counter() - run.started,
            "bad_steps": state.bad_steps,
        }
        run.metrics.log(record)
        state.log_loss, state.log_targets = 0.0, 0
        self.tokens, self.started = 0, time.perf_counter()
        return record


def _micro_batch_seed(seed: int, epoch: int, window: int, index: int) -> int:
    """A distinct, reproducible RNG seed for each micro-batch of the run."""
    return (seed * 1_000_003 + epoch * 7_919_009 + window * 4_099 + index) % (2**63)


def _wrap_for_processes(model: Any, accelerator: Any, fsdp: bool = False) -> Any:
    """DDP over the adapter only (the frozen 4-bit base is neither broadcast nor synced), or FSDP2 (``fsdp:
    true``): each decoder layer, then the rest, sharded over the processes (``fully_shard``), parameter by
    parameter, the 4-bit weights in their float storage with the adapter."""
    if accelerator.num_processes == 1:
        return model
    if fsdp:
        fully_shard, _ = fsdp2()
        layers = set(getattr(model, "_no_split_modules", None) or [])
        for module in list(model.modules()):
            if type(module).__name__ in layers:
                fully_shard(module)
        fully_shard(model, reshard_after_forward=False)  # the head stays whole for the fused loss after forward
        return model
    model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
    return accelerator.prepare_model(model, device_placement=False)


def _any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when any process has it set (a signal may reach only one)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


class TrainingDiverged(QLoRAError):
    exit_code = 1


class TrainingInterrupted(QLoRAError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _windows(batches: list[list[int]], accumulation: int) -> list[list[list[int]]]:
    """Group micro-batches into optimizer steps; the epoch's last step may have fewer micro-batches."""
    return [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]


def _is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED
