"""``qlora merge``: deployable full weights from a run, streamed tensor by tensor and proven by a self-check.

    base model shards (safetensors)
        │  per tensor, in file order, read with plain file reads (no mmap)
        ├─ targeted weight:  W' = base(W) + scaling · B @ A     float32 (transposed for Conv1D), then --dtype
        └─ anything else:    copied bit for bit (cast only when --dtype changes the base shards' main dtype)
        ▼
    output shards (a streaming safetensors writer; headers planned from the input headers)
    + model.safetensors.index.json, config.json without quantization_config, generation config, tokenizer
        ▼
    self-check: logits of the merged model (plain transformers, float32) vs the adapter on its base

``base(W)`` is, by default (``dequantized``), exactly the weight the adapter was trained against:
dequant(NF4(W)) computed with the run's quantization settings from ``W`` cast to the run's compute dtype,
which is what transformers + bitsandbytes do when they load the base in 4 bits (a test checks the two are
bit-identical). ``original`` uses the base shards' weight itself. Nothing is ever re-quantized. Only targeted
layers change: linear layers the run held in 4 bits without an adapter keep their base weights, so
the self-check compares with the adapter on a base quantized in the targeted layers only, and reports the
distance to the all-4-bit training-time model beside it.

Memory: one tensor at a time, plus the previous merged tensor while a second thread writes it. The peak is
a few float32 copies of the largest targeted weight plus the adapter; untargeted tensors are copied in
64 MiB chunks. Never a shard, never the model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from rich.console import Console

from qlora_cli.config import QuantSettings, parse_size
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.layout import MODEL_CONFIG
from qlora_cli.merge.plan import (
    RowsTarget,
    Target,
    model_skeleton,
    plan_rows,
    plan_targets,
    read_base_config,
    resolve_base_folder,
)
from qlora_cli.merge.report import LayerStat, MergeResult, print_report
from qlora_cli.merge.safetensors_stream import (
    CODE_OF_DTYPE,
    DTYPE_OF_CODE,
    FLOAT_CODES,
    INDEX_FILE,
    ITEMSIZE,
    NAME_OF_CODE,
    OutTensor,
    SafetensorsWriter,
    TensorInfo,
    base_shard_files,
    copy_chunks,
    plan_shards,
    read_header,
    read_tensor,
    tensor_bytes,
)
from qlora_cli.merge.self_check import self_check
from qlora_cli.merge.weights import grown_rows, merged_weight
from qlora_cli.model.gguf import resolve_gguf
from qlora_cli.model.loading import DTYPES, quiet_libraries, resolve_device
from qlora_cli.outputs import (
    OWNER_FILE,
    available_memory,
    check_disk,
    publish,
    release_memory,
    remove_stale_temp_folders,
    size_text,
)
from qlora_cli.run_folder import RunFolder, open_run

BASE_WEIGHTS = ("dequantized", "original")
DEFAULT_SHARD_SIZE = "5GB"


# ---------------------------------------------------------------------------------------------
# the command


def check_output(output: Path, force: bool, protected: list[Path]) -> None:
    """Refuse a non-empty output (without --force), a file, or a folder holding the run or the base."""
    if output.exists() and not output.is_dir():
        raise ModelError(f"output {output} is a file, not a folder")
    resolved = output.resolve()
    for p in protected:
        p = p.resolve()
        if resolved == p or resolved in p.parents:
            raise ModelError(f"output {output} would replace {p}; choose another folder")
    if output.exists() and any(output.iterdir()) and not force:
        raise ModelError(f"output folder {output} exists and is not empty (use --force to replace it)")


def run_merge(
    run_path: str | Path,
    output: str | Path,
    *,
    base: str | None = None,
    base_weights: str = "dequantized",
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    verify: bool = True,
    device: str = "auto",
    console: Console | None = None,
) -> MergeResult:
    """Merge a run's adapter into its base and write a plain transformers model folder to ``output``.

    Everything that can be wrong with the input is checked before anything is written; the output appears
    at ``output`` only once complete (written beside it, then renamed). Raises ``QLoRAError`` subclasses.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    started = time.perf_counter()
    if base_weights not in BASE_WEIGHTS:
        raise ConfigError(f"--base-weights must be one of {', '.join(BASE_WEIGHTS)}, got {base_weights!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size, "--max-shard-size")
    torch_device = resolve_device(device)
    quiet_libraries()

    # -- read and check everything first
    source = prepare_source(run_path, base, base_weights)
    run, folder, infos, targets, scaling, quant = (
        source.run,
        source.folder,
        source.infos,
        source.targets,
        source.scaling,
        source.quant,
    )
    out = Path(output).expanduser()
    check_output(out, force, [run.path, folder])
    main_code = _main_float_code(infos)
    out_code = CODE_OF_DTYPE[DTYPES[dtype]] if dtype else ("BF16" if main_code in ("F32", "F64") else main_code)
    tokenizer = source.tokenizer

    def planned(t: TensorInfo) -> OutTensor:
        if t.name in source.rows:  # grown for new tokens, with the trained rows
            shape = source.out_shape(t)
            return OutTensor(t.name, out_code, shape, math.prod(shape) * ITEMSIZE[out_code])
        if t.name in targets or (t.dtype == main_code and t.dtype != out_code):
            return OutTensor(t.name, out_code, t.shape, t.numel * ITEMSIZE[out_code])
        return OutTensor(t.name, t.dtype, t.shape, t.nbytes)  # copied bit for bit

    entries = [planned(t) for t in infos]
    shards = plan_shards(entries, max_bytes)
    total = sum(t.nbytes for t in entries)
    check_disk(out, total, "the merged model")

    # -- write into a temporary folder beside the output
    console.print(
        f"merging {len(targets)} layers of {run.path} into {folder} ({base_weights} base weights, "
        f"scaling {scaling:g}) -> {out} ({NAME_OF_CODE[out_code]}, {len(shards)} shard(s), {size_text(total)})"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    (tmp / OWNER_FILE).write_text(str(os.getpid()))
    try:
        layers = _write_weights(
            tmp, infos, entries, shards, targets, source.rows, scaling, base_weights, quant, torch_device, console
        )
        _write_config(tmp, source.config, NAME_OF_CODE[out_code])
        if (folder / "generation_config.json").exists():
            shutil.copy2(folder / "generation_config.json", tmp / "generation_config.json")
        if run.model.trust_remote_code:
            for py in folder.glob("*.py"):
                shutil.copy2(py, tmp / py.name)
        tokenizer.save_pretrained(tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = MergeResult(
        out, NAME_OF_CODE[out_code], base_weights, len(infos), len(targets), len(shards), total, 0.0, layers, None
    )
    console.print(f"[green]wrote[/green] {out} in {time.perf_counter() - started:.1f}s")

    # -- prove it
    if verify:
        need = check_memory_need(infos)
        have = available_memory(torch_device)
        if have is not None and need > have:
            result.check_skipped = (
                f"the self-check needs about {size_text(need)} of memory, {size_text(have)} is available"
            )
        else:
            result.check = self_check(run, out, base_weights, torch_device, tokenizer=tokenizer)
    result.seconds = time.perf_counter() - started
    print_report(console, result)
    return result


@dataclass
class MergeSource:
    """Everything a merge reads, checked: the run (its base resolved to a local folder of safetensors shards),
    the base's config and tensors (in file order), the targeted tensors with their adapter weights."""

    run: RunFolder
    folder: Path
    config: dict[str, Any]
    infos: list[TensorInfo]
    targets: dict[str, Target]
    scaling: float
    quant: QuantSettings
    tokenizer: Any
    rows: dict[str, RowsTarget] = field(default_factory=dict)  # the embedding (and head) grown for new tokens

    def out_shape(self, info: TensorInfo) -> tuple[int, ...]:
        """The tensor's shape in the output: a grown embedding's rows, otherwise the base's."""
        rows = self.rows.get(info.name)
        return info.shape if rows is None else (rows.size, *info.shape[1:])


def prepare_source(run_path: str | Path, base: str | None, base_weights: str) -> MergeSource:
    """Open the run and its base and check the adapter fits; nothing is written. Raises ``QLoRAError``."""
    run = open_run(run_path, base=base)
    adapter_config, state = run.adapter
    run = replace(run, model=resolve_gguf(run.model))  # a GGUF base: its dequantized folder holds the originals
    folder = resolve_base_folder(run.model.base_model)
    run = replace(run, model=replace(run.model, base_model=str(folder)))
    config = read_base_config(folder)
    infos: list[TensorInfo] = []
    for path in base_shard_files(folder):
        infos.extend(read_header(path)[0])
    tensors = {t.name: t for t in infos}
    if len(tensors) != len(infos):
        raise ModelError(f"base model {folder}: a tensor name appears in two shards")
    quant = run.model.quant
    if quant.load_in_4bit and base_weights == "dequantized":
        _require_bitsandbytes()
    elif quant.load_in_4bit and not _has_bitsandbytes():  # original: the NF4 error report needs it, nothing else
        quant = replace(quant, load_in_4bit=False)
    skeleton = model_skeleton(folder, run.model.trust_remote_code)
    targets, scaling = plan_targets(run.path, adapter_config, state, skeleton, tensors, quant)
    rows = plan_rows(run.path, adapter_config, state, skeleton, tensors)
    both = set(rows) & set(targets)
    if both:
        raise ModelError(f"adapter {run.path} trains both LoRA and token rows of {sorted(both)[0]}")
    del skeleton, state
    from qlora_cli.model.loading import load_tokenizer

    tokenizer = load_tokenizer(run.model)
    if rows:  # new tokens: the merged model's vocabulary is the grown embedding's
        size = next(iter(rows.values())).size
        if len(tokenizer) > size:
            raise ModelError(
                f"the run's tokenizer has {len(tokenizer)} tokens but its trained embedding {size} rows; "
                "the tokenizer beside the adapter is not the one it trained with"
            )
        config = _with_vocab_size(config, size)
    return MergeSource(run, folder, config, infos, targets, scaling, quant, tokenizer, rows)


def _with_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """The base's config.json with ``vocab_size`` (top level, and a multimodal model's ``text_config``) set."""
    config = dict(config)
    if "vocab_size" in config or "text_config" not in config:
        config["vocab_size"] = size
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {**config["text_config"], "vocab_size": size}
    return config


def merged_tensors(
    source: MergeSource, base_weights: str, device: torch.device
) -> Iterator[tuple[TensorInfo, torch.Tensor, LayerStat | None]]:
    """Every base tensor in file order, one at a time: (its header, the tensor (a targeted weight merged, in
    float32 and the base shard's layout; anything else as stored), the merge statistics of a targeted one)."""
    current: BinaryIO | None = None
    try:
        for info in source.infos:
            if current is None or current.name != str(info.file):
                if current is not None:
                    current.close()
                current = open(info.file, "rb")
            weight = read_tensor(current, info)
            target = source.targets.get(info.name)
            if info.name in source.rows:
                yield info, grown_rows(weight, source.rows[info.name]), None
                continue
            if target is None:
                yield info, weight, None
                continue
            merged, stat = merged_weight(weight, target, source.scaling, base_weights, source.quant, device)
            del weight
            yield info, merged, stat
            del merged
            release_memory()
    finally:
        if current is not None:
            current.close()


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        return False
    return True


def _require_bitsandbytes() -> None:
    if not _has_bitsandbytes():
        raise ModelError(
            "--base-weights dequantized needs bitsandbytes to reproduce the 4-bit weights; "
            "pip install 'bitsandbytes>=0.50' (or use --base-weights original)"
        ) from None


def _main_float_code(infos: list[TensorInfo]) -> str:
    by_bytes: dict[str, int] = {}
    for t in infos:
        if t.dtype in FLOAT_CODES:
            by_bytes[t.dtype] = by_bytes.get(t.dtype, 0) + t.nbytes
    if not by_bytes:
        raise ModelError("the base model has no floating-point tensors")
    return max(by_bytes, key=by_bytes.__getitem__)


def _write_weights(
    folder: Path,
    infos: list[TensorInfo],
    entries: list[OutTensor],
    shards: list[list[int]],
    targets: dict[str, Target],
    rows: dict[str, RowsTarget],
    scaling: float,
    base_weights: str,
    quant: QuantSettings,
    device: torch.device,
    console: Console,
) -> list[LayerStat]:
    """Stream every tensor into the output shards and write the index. Returns per-layer statistics."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    layers: list[LayerStat] = []
    total = sum(t.nbytes for t in infos)
    progress = Progress(
        TextColumn("[bold]merge"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    done = 0
    current: BinaryIO | None = None
    # A merged tensor is written by a second thread while the next one is read and merged: disk and CPU work
    # overlap, and at most one merged tensor waits in memory.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlora-merge-write")
    pending: Future | None = None

    def settle() -> None:  # wait for the write in flight (and raise its error)
        nonlocal pending
        if pending is not None:
            pending.result()
            pending = None

    with progress:
        task = progress.add_task("merge", total=total, info="")
        try:
            for shard_no, indices in enumerate(shards):
                writer = SafetensorsWriter(folder / names[shard_no], [entries[i] for i in indices], {"format": "pt"})
                try:
                    for i in indices:
                        info, code = infos[i], entries[i].dtype
                        if current is None or current.name != str(info.file):  # input files come one after another
                            if current is not None:
                                current.close()
                            current = open(info.file, "rb")
                        target = targets.get(info.name)
                        if info.name in rows:
                            grown = grown_rows(read_tensor(current, info), rows[info.name])
                            settle()
                            writer.write(info.name, [tensor_bytes(grown.to(DTYPE_OF_CODE[code]))])
                            del grown
                        elif target is None:
                            settle()
                            writer.write(info.name, copy_chunks(current, info, code))
                        else:
                            weight = read_tensor(current, info)
                            merged, stat = merged_weight(weight, target, scaling, base_weights, quant, device)
                            del weight
                            data = [tensor_bytes(merged.to(DTYPE_OF_CODE[code]))]
                            del merged
                            settle()
                            pending = pool.submit(writer.write, info.name, data)
                            del data
                            layers.append(stat)
                            release_memory()
                        weight_map[info.name] = names[shard_no]
                        done += 1
                        progress.update(task, advance=info.nbytes, info=f"{done}/{len(infos)} tensors")
                    settle()
                except BaseException:
                    if pending is not None:
                        wait([pending])  # the file is not closed under a write in flight
                    writer.f.close()
                    raise
                writer.close()
        finally:
            pool.shutdown(wait=True)
            if current is not None:
                current.close()
    index = {"metadata": {"total_size": sum(t.nbytes for t in entries)}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return layers


def _write_config(folder: Path, config: dict[str, Any], dtype: str) -> None:
    """The base's config.json as it is, minus any quantization_config, with the output dtype."""
    config = dict(config)
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    if "torch_dtype" in config:  # older transformers' name for the same key
        config["torch_dtype"] = dtype
    (folder / MODEL_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_memory_need(infos: list[TensorInfo]) -> int:
    """Bytes the self-check holds at once: the merged model in float32 (loaded after the reference is freed)."""
    params = sum(t.numel for t in infos if t.dtype in FLOAT_CODES)
    return int(params * 4 * 1.2)
