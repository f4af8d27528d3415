"""How much memory a training run will take, predicted from the config alone, before any weight is loaded.

    resident  = 4-bit weights + their quantization constants + 16-bit embeddings/head + float32 norms/biases
              + adapter (float32) + optimizer state (+ gradients when they live across micro-batches)
    step peak = the largest amount of memory a forward + backward of one micro-batch holds on top of that
              (saved activations, logits and loss buffers, dequantized weights, gradients as they appear)
    tensor peak = resident + step peak        (torch.cuda.max_memory_allocated on a GPU; measured on CPU)
    GPU total   = tensor peak + CUDA context + caching-allocator reserve

The resident parts are exact byte counts from the model's shapes. The step peak is not a formula: qlora's own
training step (collate -> ``loss.loss_sum`` -> the transformers model with qlora's LoRA layers -> backward)
runs on *fake* tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data, no memory), under
the same autocast, gradient checkpointing and dropout, while a dispatch-level tracer adds up every tensor
storage created and freed. So the plan follows whatever the training code does: a chunked loss added to
``loss.py`` shows up in the plan without touching this file. (The micro-batch step is ``step.micro_batch_step``
itself: collate, autocast, ``loss_sum`` with ``fused_cross_entropy``, backward, with the LoRA layers' ``fused``
flag and gradient checkpointing set as ``train`` sets them.) The approximations:

- the base's 4-bit linear layers run as a stand-in with bitsandbytes' memory behaviour (4-bit weights resident,
  the weight dequantized into a temporary in forward and again in backward, nothing saved for backward; the
  fused LoRA kernel's per-shape dequantization buffer on CUDA);
- the step is traced with 1 and 2 decoder layers (or one and two periods of a repeating layer pattern) and
  extrapolated linearly to the real depth, which is exact when the layers repeat (each one saves the same);
- data-dependent values are the worst case: full-length, unpadded batches, every position a target;
- kernels that allocate inside one op (``logsumexp``) get that workspace added; others are not seen.

For a GPU the trace still runs on fake CPU tensors (a CPU-only torch cannot index fake CUDA ones) with CUDA's
memory behaviour swapped in (``_cuda_behaviour``): flash attention (saves the output and a float32
log-sum-exp, nothing quadratic), dropout's 1-byte mask, autocast's float32 norms and softmax. For CPU it runs
the CPU kernels as they are, which is what the tests compare against measured CPU runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qlora_cli.config import RunConfig
from qlora_cli.errors import ConfigError, QLoRAError
from qlora_cli.memory_plan.sizes import (
    TargetInfo,
    adapter_shapes,
    extra_trained_shapes,
    format_bytes,
    load_model_config,
    meta_model,
    num_layers_of,
    optimizer_state_bytes,
    target_infos,
    weight_bytes,
)
from qlora_cli.memory_plan.tracer import StepTrace, traced_peak

# -- GPU-only constants (not part of the CPU comparison) -------------------------------------------------
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + cuBLAS/cuDNN handles and workspaces: ~0.3-0.6 GiB on recent GPUs
ALLOCATOR_RESERVE = 0.08  # caching-allocator rounding and fragmentation: reserved exceeds allocated by ~5-10%


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class Component:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    device: str  # "cuda" (one GPU) or "cpu"
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool | str  # True, False or "offload"
    resident: list[Component]
    step: list[Component]  # live at the peak of one micro-batch's forward + backward
    tensor_peak: int  # resident + step peak: what torch.cuda.max_memory_allocated reports
    overhead: list[Component]  # GPU only: CUDA context and allocator reserve
    total: int  # what the GPU must have
    activations_with_checkpointing: int | None  # the step peak with and without gradient checkpointing
    activations_without_checkpointing: int | None
    eval_peak: int | None = None  # tensor peak during evaluation, when there is eval data
    gpu_memory: int | None = None
    fits: bool | None = None
    max_micro_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)
    processes: int = 1  # the plan is per process of this many
    fsdp: bool = False

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def plan_memory(
    cfg: RunConfig,
    model_config: Any | None = None,
    *,
    device_type: str | None = None,
    gpu_memory: int | None = None,
    targets: list[TargetInfo] | None = None,
    search_batch: bool = True,
    processes: int = 1,
    fsdp: bool = False,
) -> MemoryPlan:
    """The memory plan of ``cfg`` for one device ("cuda" unless the config says ``device: cpu``): for one of
    ``processes`` (DDP: each holds everything, plus its gradient buckets; ``fsdp``: the base, adapter and optimizer
    state sharded over them, one layer gathered whole at a time)."""
    if processes < 1:
        raise ConfigError(f"--processes must be 1 or more, got {processes}")
    if fsdp and processes < 2:
        raise ConfigError("--fsdp shards over several processes: give --processes 2 or more")
    if fsdp and cfg.load_in_4bit and cfg.bnb_4bit_quant_storage == "uint8":
        raise ConfigError(
            "FSDP shards the 4-bit base only with a float quant storage: set bnb_4bit_quant_storage to the compute "
            f"dtype ({cfg.bnb_4bit_compute_dtype})"
        )
    optimizer_name = cfg.optimizer
    if fsdp and optimizer_name != "adamw_torch":  # what `fsdp: true` runs: torch's AdamW unless set otherwise
        if "optimizer" in cfg.model_fields_set:
            raise ConfigError(f"FSDP cannot run optimizer: {optimizer_name} (sharded parameters); use adamw_torch")
        optimizer_name = "adamw_torch"
    model_config = model_config if model_config is not None else load_model_config(cfg)
    device_type = device_type or ("cpu" if cfg.device == "cpu" else "cuda")
    if cfg.bnb_4bit_compute_dtype == "float16" and device_type == "cpu":
        raise ConfigError("bnb_4bit_compute_dtype: float16 needs a GPU; use bfloat16 or float32 on CPU")
    skeleton = meta_model(model_config, cfg)
    if targets is None:
        targets = target_infos(skeleton, cfg)
    weights = weight_bytes(skeleton, cfg)
    lora_shapes = adapter_shapes(targets, cfg.lora_r)
    shapes = lora_shapes + extra_trained_shapes(skeleton, cfg, targets)  # DoRA, copies, token rows
    adapter = sum(math.prod(s) for s in shapes) * 4
    optimizer = optimizer_state_bytes(optimizer_name, shapes)
    offset = sum(math.prod(s) for s in lora_shapes) * 4 if cfg.lora.offset_start else 0  # PiSSA/OLoRA's frozen start
    # collate pads to a multiple of 8 on CUDA; the plan assumes every micro-batch is padded to sequence_len
    seq_len = -(-cfg.sequence_len // 8) * 8 if device_type == "cuda" else cfg.sequence_len
    resident = [
        Component("weights_4bit", "4-bit weights", weights.quantized_4bit, f"{weights.params_quantized:,} params"),
        Component(
            "quant_constants",
            "quantization constants",
            weights.quant_constants,
            "double quantization" if cfg.bnb_4bit_use_double_quant else "float32 absmax per 64",
        ),
        Component(
            "unquantized",
            f"unquantized weights ({cfg.bnb_4bit_compute_dtype})",
            weights.unquantized_16bit,
            "embeddings, output head",
        ),
        Component(
            "small_float32",
            "norms, biases, buffers",
            weights.small_float32,
            "float32" if cfg.bnb_4bit_compute_dtype != "float32" else "",
        ),
        Component("adapter", "LoRA adapter (float32)", adapter, f"{adapter // 4:,} params"),
        Component("start_offset", "frozen start (PiSSA / OLoRA)", offset, "float32"),
        Component("optimizer", f"optimizer state ({optimizer_name})", optimizer, ""),
    ]
    if cfg.gradient_accumulation_steps > 1:
        resident.append(Component("gradients", "gradients (float32)", adapter, "kept across micro-batches"))
    gathered = 0  # FSDP: what a process holds unsharded while a layer runs
    if processes > 1 and fsdp:
        shard = {"weights_4bit", "unquantized", "small_float32", "adapter", "optimizer", "gradients"}
        for c in resident:
            if c.key in shard:
                c.bytes, c.note = -(-c.bytes // processes), f"1/{processes} of {format_bytes(c.bytes)} (sharded)"
        n_layers = num_layers_of(model_config)
        gathered = 2 * -(-weights.quantized_4bit // max(n_layers, 1)) + weights.unquantized_16bit
        resident.append(
            Component(
                "fsdp_gathered",
                "gathered for compute (FSDP)",
                gathered,
                "two decoder layers' 4-bit weights (this one and the prefetched next) and the embeddings and head",
            )
        )
    elif processes > 1:
        resident.append(Component("ddp_buckets", "DDP gradient buckets (float32)", adapter, "all-reduce buffers"))
    resident = [c for c in resident if c.bytes or c.key in ("adapter", "optimizer")]
    resident_total = sum(c.bytes for c in resident)

    # DPO and ORPO run a micro-batch's chosen and rejected responses as one batch of twice the sequences
    sequences = 2 if cfg.method in ("dpo", "orpo") else 1

    def step(batch: int, checkpointing: bool, train: bool = True) -> StepTrace:
        return traced_peak(
            model_config,
            cfg,
            device_type=device_type,
            micro_batch_size=batch * sequences,
            seq_len=seq_len,
            gradient_checkpointing=checkpointing,
            train=train,
        )

    trace_error = None
    try:
        main = step(cfg.micro_batch_size, bool(cfg.gradient_checkpointing))
        other = step(cfg.micro_batch_size, not cfg.gradient_checkpointing)
        eval_trace = step(cfg.eval_micro_batch_size, False, train=False) if cfg.has_eval else None
    except QLoRAError:
        raise
    except Exception as e:  # an architecture fake tensors cannot run (e.g. data-dependent expert routing)
        trace_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        main = other = StepTrace(0, {})
        eval_trace = None
    # the optimizer step holds the gradients and a few temporaries of the adapter's size
    optimizer_phase = 3 * adapter if cfg.gradient_accumulation_steps == 1 else 2 * adapter
    step_peak = max(main.peak, optimizer_phase)
    labels = {
        "activations": "activations",
        "logits and loss": "logits and loss buffers",
        "dequantized weight": "dequantized weight (temporary)",
        "gradients": "gradients (float32)",
    }
    step_components = [
        Component(k.replace(" ", "_"), labels.get(k, k), v) for k, v in sorted(main.by_tag.items(), key=_tag_order)
    ]
    tensor_peak = resident_total + step_peak
    with_gc, without_gc = (main, other) if cfg.gradient_checkpointing else (other, main)

    def overhead_for(peak: int) -> list[Component]:
        if device_type != "cuda":
            return []
        return [
            Component("cuda_context", "CUDA context and workspaces", CUDA_CONTEXT_BYTES, "constant"),
            Component(
                "allocator_reserve",
                "allocator reserve",
                int(peak * ALLOCATOR_RESERVE),
                f"{ALLOCATOR_RESERVE:.0%} of the tensor peak",
            ),
        ]

    overhead = overhead_for(tensor_peak)
    total = tensor_peak + sum(c.bytes for c in overhead)
    eval_peak = None
    if eval_trace is not None:
        eval_peak = resident_total - (adapter if cfg.gradient_accumulation_steps > 1 else 0) + eval_trace.peak
        if eval_peak > tensor_peak:
            total = eval_peak + sum(c.bytes for c in overhead_for(eval_peak))
    plan = MemoryPlan(
        device=device_type,
        micro_batch_size=cfg.micro_batch_size,
        seq_len=seq_len,
        gradient_checkpointing=cfg.gradient_checkpointing,
        resident=resident,
        step=step_components,
        tensor_peak=tensor_peak,
        overhead=overhead,
        total=total,
        activations_with_checkpointing=with_gc.peak,
        activations_without_checkpointing=without_gc.peak,
        eval_peak=eval_peak,
        gpu_memory=gpu_memory,
    )
    plan.processes, plan.fsdp = processes, fsdp and processes > 1
    plan.notes.append(f"assumes every micro-batch is {seq_len} tokens long (the worst case); shorter batches take less")
    if processes > 1:
        plan.notes.append(
            f"per process of {processes} ({'FSDP' if fsdp else 'DDP'}); each runs micro_batch_size examples per "
            f"micro-batch: the effective batch is {cfg.micro_batch_size * cfg.gradient_accumulation_steps * processes}"
        )
    if trace_error is not None:
        plan.activations_with_checkpointing = plan.activations_without_checkpointing = None
        plan.notes.append(
            f"could not trace this architecture's training step on fake tensors ({trace_error}); "
            "activations, logits and loss buffers are missing from this plan"
        )
    if gpu_memory is not None:
        plan.fits = total <= gpu_memory
        if search_batch and trace_error is None:
            plan.max_micro_batch_size = _largest_batch(plan, resident_total, main, step, gpu_memory)
    return plan


def _tag_order(item: tuple[str, int]) -> int:
    order = ["activations", "logits and loss", "dequantized weight", "gradients"]
    return order.index(item[0]) if item[0] in order else len(order)


def _largest_batch(plan: MemoryPlan, resident: int, at_batch: StepTrace, step: Any, budget: int) -> int:
    """The largest micro_batch_size whose total fits ``budget``. The step peak is affine in the batch size
    (every activation, logit and loss buffer has a batch dimension; the dequantized-weight temporaries do not),
    so a second trace at one more example gives the slope and the answer in closed form."""
    b0 = plan.micro_batch_size
    slope = max(step(b0 + 1, bool(plan.gradient_checkpointing)).peak - at_batch.peak, 1)
    fixed = at_batch.peak - slope * b0  # the part of the step peak that does not grow with the batch
    if plan.device == "cuda":  # total = (resident + step) * (1 + reserve) + context
        room = (budget - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_RESERVE) - resident - fixed
    else:
        room = budget - resident - fixed
    return max(0, int(room // slope))
