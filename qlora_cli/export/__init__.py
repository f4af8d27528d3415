"""``qlora export``: a run as one GGUF file for llama.cpp, Ollama and LM Studio, or its adapter as a GGUF LoRA.

    --format gguf        the merged weights (``qlora merge``'s, streamed tensor by tensor) in llama.cpp's layout,
                         quantized per tensor (``--quant``), with the tokenizer and the run's chat template;
                         an Ollama Modelfile beside it
    --format gguf-lora   the adapter alone, for ``llama-cli -m base.gguf --lora adapter.gguf``

The file is written beside the output under a temporary name, read back by transformers' own GGUF loader (an
independent reader) and compared with the adapter on its base (``self_check``), and only then renamed into
place; a failed check exits 1 and leaves nothing. Bad input is refused before anything is written.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.export.gguf_arch import (
    DEFAULT_QUANT,
    QUANTS,
    ArchSpec,
    TensorNames,
    arch_spec,
    changes_layout,
    llama3_rope_factors,
    metadata,
    permute_rotary,
    tensor_type,
    to_gguf_layout,
)
from qlora_cli.export.gguf_vocab import source_gguf_file, vocab_metadata
from qlora_cli.export.kquants import QUANTIZERS
from qlora_cli.export.ollama import check_modelfile, matching_family, modelfile_path, modelfile_text, run_commands
from qlora_cli.layout import MODEL_CONFIG
from qlora_cli.merge import BASE_WEIGHTS, MergeSource, check_memory_need, merged_tensors, prepare_source
from qlora_cli.model.loading import quiet_libraries, resolve_device
from qlora_cli.outputs import available_memory, check_disk, remove_stale_temp_files, size_text, usual_mode

FORMATS = ("gguf", "gguf-lora")
LORA_QUANTS = ("f32", "f16")  # a GGUF LoRA's A and B matrices: small, and llama.cpp adds them in float
GGUF_WRITE_MIN_VERSION = "0.13.0"


@dataclass
class ExportResult:
    output: Path
    format: str
    quant: str
    n_tensors: int
    nbytes: int
    seconds: float = 0.0
    modelfile: Path | None = None
    check: Any = None  # merge.self_check.CheckResult
    check_skipped: str | None = None
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count


def run_export(
    run_path: str | Path,
    output: str | Path,
    *,
    fmt: str = "gguf",
    quant: str | None = None,
    base: str | None = None,
    base_weights: str = "dequantized",
    force: bool = False,
    verify: bool = True,
    device: str = "auto",
    console: Console | None = None,
) -> ExportResult:
    """Export a run (see the module docstring). Raises ``QLoRAError`` subclasses for bad input."""
    console = console or Console(stderr=True, soft_wrap=True)
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    allowed = QUANTS if fmt == "gguf" else LORA_QUANTS
    quant = quant or (DEFAULT_QUANT if fmt == "gguf" else "f32")
    if quant not in allowed:
        raise ConfigError(f"--quant for --format {fmt} must be one of {', '.join(allowed)}, got {quant!r}")
    if base_weights not in BASE_WEIGHTS:
        raise ConfigError(f"--base-weights must be one of {', '.join(BASE_WEIGHTS)}, got {base_weights!r}")
    _require_gguf()
    out = Path(output).expanduser()
    if out.is_dir():
        raise ModelError(f"output {out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not force:
        raise ModelError(f"output {out} exists (use --force to replace it)")
    torch_device = resolve_device(device)
    quiet_libraries()

    from qlora_cli.run_folder import open_run

    run = open_run(run_path, base=base)
    source_gguf = source_gguf_file(run.model.base_model)
    # the vocabulary is copied from the GGUF base only where the run trained with that base's own tokenizer
    vocab_gguf = source_gguf if source_gguf and not (run.config and run.config.base.tokenizer) else None
    source = prepare_source(run_path, base, base_weights)
    spec = arch_spec(source.config)
    names = TensorNames(spec)
    check_not_an_input(out, input_files(source, source_gguf))
    if fmt == "gguf-lora":
        if source.rows:
            raise ConfigError(
                f"{run_path} trains embedding rows (new tokens or modules_to_save): a llama.cpp LoRA file cannot "
                "change the base's vocabulary or embedding, so --format gguf-lora cannot hold it; export the merged "
                "model (--format gguf)"
            )
        if any(t.magnitude is not None for t in source.targets.values()):
            raise ConfigError(
                f"{run_path} is a DoRA adapter (use_dora): llama.cpp applies plain LoRA only, so --format gguf-lora "
                "cannot hold it; export the merged model (--format gguf) instead"
            )
        return _export_lora(source, spec, names, out, quant, started, console)

    modelfile = modelfile_path(out, quant)
    check_modelfile(modelfile, out, force)
    family = matching_family(source.tokenizer)
    modelfile_tmp: Path | None = None
    vocab_size = int(source.config["vocab_size"])
    kv = {**metadata(spec, source.config), **vocab_metadata(source.tokenizer, vocab_size, vocab_gguf, source.config)}
    plan = _plan(source, spec, names, quant)
    rope_factors = llama3_rope_factors(source.config, spec.head_dim)
    total = sum(p.nbytes for p in plan.values()) + (0 if rope_factors is None else rope_factors.nbytes)
    check_disk(out, total, "the file")

    console.print(
        f"exporting {source.run.path} ({spec.model_type}, {len(source.targets)} merged layers, {base_weights} base "
        f"weights) -> {out} (GGUF {quant}, {size_text(total)})"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out, TEMP_MARK)
    tmp = _temp_file(out, ".gguf")
    try:
        _write_gguf(tmp, spec, source, quant, kv, plan, rope_factors, base_weights, torch_device)
        usual_mode(tmp)
        result = ExportResult(out, fmt, quant, len(plan), tmp.stat().st_size)
        for p in plan.values():
            result.types[p.type_name] = result.types.get(p.type_name, 0) + 1
        console.print(f"[green]wrote[/green] {tmp.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.1f}s")
        need, have = check_memory_need(source.infos), available_memory(torch_device)
        if verify and have is not None and need > have:
            result.check_skipped = (
                f"the self-check needs about {size_text(need)} of memory, {size_text(have)} is available"
            )
            console.print(f"[yellow]self-check skipped: {result.check_skipped}[/yellow]")
        elif verify:
            from qlora_cli.export.check import check_export

            result.check = check_export(source, tmp, quant, base_weights, torch_device, console)
            if not result.check.passed:
                tmp.unlink(missing_ok=True)
                result.seconds = time.perf_counter() - started
                return result
        modelfile_tmp = _temp_file(out, ".Modelfile")
        modelfile_tmp.write_text(modelfile_text(out, family))
        usual_mode(modelfile_tmp)
        os.replace(tmp, out)
        os.replace(modelfile_tmp, modelfile)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if modelfile_tmp is not None:
            modelfile_tmp.unlink(missing_ok=True)
        raise
    result.modelfile = modelfile
    console.print(
        f"[green]wrote[/green] {out} ({QUANTS[quant][0]}) and {modelfile}\n{run_commands(out, modelfile, family)}"
    )
    result.seconds = time.perf_counter() - started
    return result


def input_files(source: MergeSource, source_gguf: str | None) -> list[Path]:
    """Every file the export reads: the adapter and run config, the base's config, index and shards (a GGUF
    base's converted folder and the .gguf itself), and the tokenizer's files."""
    from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE
    from qlora_cli.merge.safetensors_stream import INDEX_FILE, base_shard_files

    run = source.run.path
    files = [run / ADAPTER_WEIGHTS, run / ADAPTER_CONFIG, run / CONFIG_FILE]
    files += [source.folder / MODEL_CONFIG, source.folder / INDEX_FILE, *base_shard_files(source.folder)]
    tokenizer = Path(source.run.model.tokenizer or source.folder)
    files += [p for p in tokenizer.iterdir() if p.is_file()] if tokenizer.is_dir() else []
    if source_gguf is not None:
        files.append(Path(source_gguf).expanduser())
    return files


def check_not_an_input(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is (names, resolves to, or is a hard link of) a file the export reads."""
    target = out.resolve()
    for f in inputs:
        same = target == f.resolve()
        if not same and out.exists() and f.exists():
            same = os.path.samefile(out, f)
        if same:
            raise ModelError(f"output {out} is {f}, which this export reads; choose another file")


def _write_gguf(
    path: Path,
    spec: ArchSpec,
    source: MergeSource,
    quant: str,
    kv: dict[str, Any],
    plan: dict[str, PlannedTensor],
    rope_factors: np.ndarray | None,
    base_weights: str,
    device: torch.device,
) -> None:
    """Header, metadata and tensor infos first (every size is planned), then each merged tensor as it comes."""
    writer = _open_writer(path, spec, source, quant, kv)
    try:
        if rope_factors is not None:
            writer.add_tensor_info("rope_freqs.weight", rope_factors.shape, np.float32, rope_factors.nbytes)
        for p in plan.values():
            writer.add_tensor_info(p.name, p.shape, np.float32, p.nbytes, raw_dtype=p.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if rope_factors is not None:
            _write_tensor(writer, [rope_factors], rope_factors.nbytes)
        for info, tensor, _stat in merged_tensors(source, base_weights, device):
            p = plan.get(info.name)
            if p is None:
                continue
            _write_tensor(writer, _encoded_chunks(spec, p, tensor), p.nbytes)
            del tensor
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
    finally:
        writer.close()


TEMP_MARK = ".qlora-export-"  # in a temporary file's name, with the pid of the export writing it


def _temp_file(out: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}{TEMP_MARK}{os.getpid()}-", suffix=suffix)
    os.close(fd)
    return Path(name)


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows, columns)
    type_name: str  # F32, F16, BF16, Q8_0, ...
    nbytes: int

    @property
    def ggml_type(self) -> Any:
        import gguf

        return gguf.GGMLQuantizationType[self.type_name]


def _plan(source: MergeSource, spec: ArchSpec, names: TensorNames, quant: str) -> dict[str, PlannedTensor]:
    """{HF tensor name: what it becomes in the file}, in the base's file order."""
    import gguf

    plan: dict[str, PlannedTensor] = {}
    for info in source.infos:
        name = names.gguf_name(info.name)
        if name is None:
            continue
        shape = tuple(source.out_shape(info))
        kind = tensor_type(quant, name, shape, spec.n_layers)
        qtype = gguf.GGMLQuantizationType[kind]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size
        plan[info.name] = PlannedTensor(name, shape, kind, nbytes)
    if not any(p.name == "output.weight" for p in plan.values()) and not spec.tied:
        raise ModelError("GGUF export: the base model has no output head (lm_head.weight) and is not tied")
    return plan


CHUNK_BYTES = 64 << 20  # float32 rows converted at a time: a 128k-token embedding is never whole in float32


def _encoded_chunks(spec: ArchSpec, p: PlannedTensor, tensor: torch.Tensor) -> Iterator[np.ndarray]:
    """The tensor as the bytes of its GGML type in llama.cpp's layout, a block of rows at a time (rows are
    quantized independently). A tensor whose layout change mixes rows (q/k's rotary permutation) or that is
    small goes whole."""
    rows = tensor.shape[0] if tensor.ndim == 2 else 1
    step = max(1, CHUNK_BYTES // max(1, tensor[0].numel() * 4)) if tensor.ndim == 2 else rows
    if rows <= step or changes_layout(spec, p.name):
        yield _encode(spec, p, tensor)
        return
    for start in range(0, rows, step):
        yield _encode(spec, p, tensor[start : start + step])


def _write_tensor(writer: Any, chunks: Iterable[np.ndarray], nbytes: int) -> None:
    """Append one tensor's data (the next one in the header's order) chunk by chunk, aligned as
    ``GGUFWriter.write_tensor_data`` aligns it; that call takes the whole array at once."""
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    written = 0
    for chunk in chunks:
        fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        written += chunk.nbytes
    if written != nbytes:
        raise AssertionError(f"GGUF export wrote {written} bytes for a tensor planned at {nbytes}")  # a bug
    writer.write_padding(fout, nbytes)


def _encode(spec: ArchSpec, p: PlannedTensor, tensor: torch.Tensor) -> np.ndarray:
    """A tensor (or a block of its rows) as the bytes of its GGML type, in llama.cpp's layout."""
    import gguf

    w = to_gguf_layout(spec, p.name, tensor.float().numpy())
    if p.type_name == "F32":
        return np.ascontiguousarray(w, dtype=np.float32)
    if p.type_name == "F16":
        return np.ascontiguousarray(w, dtype=np.float16)
    if p.type_name in QUANTIZERS:
        return QUANTIZERS[p.type_name](w)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), p.ggml_type)


def _open_writer(path: Path, spec: ArchSpec, source: MergeSource, quant: str, kv: dict[str, Any]) -> Any:
    import gguf

    writer = gguf.GGUFWriter(path, spec.arch)
    writer.add_name(source.run.path.resolve().name)
    writer.add_file_type(QUANTS[quant][1])
    if QUANTS[quant][0].startswith("Q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in kv.items():
        add_value(writer, key, value)
    return writer


def add_value(writer: Any, key: str, value: Any) -> None:
    """One metadata value with the GGUF type llama.cpp reads it as."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if key.endswith(".scores"):
            value = [float(v) for v in value]
        elif key.endswith(".token_type"):
            value = [int(v) for v in value]
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write {key} = {value!r}")


def _export_lora(
    source: MergeSource, spec: ArchSpec, names: TensorNames, out: Path, quant: str, started: float, console: Console
) -> ExportResult:
    """The adapter as a GGUF LoRA: per targeted weight, ``<name>.lora_a`` (r, in) and ``<name>.lora_b`` (out, r)
    in float32 or float16 (``quant``), B's rows permuted like the weight's; ``adapter.lora.alpha`` = scaling · r, so llama.cpp's
    alpha / r is the run's scaling (rsLoRA included)."""
    import gguf

    if not source.targets:
        raise ModelError("the run's adapter targets no weight")
    ranks = {t.lora_A.shape[0] for t in source.targets.values()}
    if len(ranks) != 1:
        raise ModelError("GGUF LoRA export needs one rank for every layer (llama.cpp takes one alpha)")
    r = ranks.pop()
    tensors: list[tuple[str, np.ndarray]] = []
    for key, target in source.targets.items():
        name = names.gguf_name(key)
        if name is None:
            raise ModelError(f"GGUF LoRA export: llama.cpp has no tensor for the adapted weight {key}")
        if target.conv1d:
            raise ModelError(f"GGUF LoRA export: {key} is a Conv1D weight, which llama.cpp does not adapt")
        a = target.lora_A.float().numpy()
        b = target.lora_B.float().numpy()
        if spec.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            b = permute_rotary(b, spec.n_heads if ".attn_q." in name else spec.n_kv_heads)
        dtype = np.float16 if quant == "f16" else np.float32
        tensors += [
            (f"{name}.lora_a", np.ascontiguousarray(a, dtype)),
            (f"{name}.lora_b", np.ascontiguousarray(b, dtype)),
        ]
    total = sum(t.nbytes for _, t in tensors)
    check_disk(out, total, "the file")
    console.print(f"exporting the adapter of {source.run.path} ({len(source.targets)} layers, r={r}) -> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out, TEMP_MARK)
    tmp = _temp_file(out, ".gguf")
    try:
        writer = gguf.GGUFWriter(tmp, spec.arch)
        writer.add_name(source.run.path.resolve().name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(source.scaling * r))
        for name, t in tensors:
            writer.add_tensor(name, t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        usual_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    kind = quant.upper()
    result = ExportResult(out, "gguf-lora", quant, len(tensors), out.stat().st_size, types={kind: len(tensors)})
    result.seconds = time.perf_counter() - started
    return result


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(f"GGUF export needs the gguf package: pip install 'gguf>={GGUF_WRITE_MIN_VERSION}'") from None
