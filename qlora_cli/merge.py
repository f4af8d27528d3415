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
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from rich.console import Console

from qlora_cli.adapter_io import adapter_modules, check_fit, linear_modules, settings_from_peft_config, targeted_modules
from qlora_cli.config import QuantSettings, parse_size
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.lora import linear_shape, output_head
from qlora_cli.model import DTYPES, autocast, is_local, quiet_libraries, resolve_device
from qlora_cli.run_folder import RunFolder, open_run

BASE_WEIGHTS = ("dequantized", "original")
DEFAULT_SHARD_SIZE = "5GB"
INDEX_FILE = "model.safetensors.index.json"
BNB_BLOCKSIZE = 64  # transformers' BitsAndBytesConfig always quantizes with bitsandbytes' default block size
COPY_CHUNK = 64 * 2**20  # bytes per read when copying an untargeted tensor

# Self-check thresholds. The merged model (loaded in float32) is compared with the adapter on its base, run
# in the run's compute dtype as in training. Limits depend on the precision involved:
#   exact: float32 compute and float32 output. A correct merge agrees to ~1e-6 in the logits (mean KL ~1e-7,
#          the float32 floor of the KL itself).
#   16-bit: bf16/fp16 compute or a 16-bit output. Rounding alone gives a mean KL of ~1e-5 on the tiny test
#          models (expect up to ~1e-3 on large ones) and flips the top token only where two tokens nearly
#          tie, so top-1 is judged where the adapter's top token leads by a clear margin.
# A corrupted merge (delta missing, wrong sign, scale, layout or layer) moves the output by a sizeable
# fraction of what the adapter itself does: it fails the absolute limits when the adapter matters much,
# else the one relative to the adapter's own effect, KL(adapter || base without adapter).


@dataclass(frozen=True)
class CheckLimits:
    max_kl: float  # mean KL(adapter || merged) per position, nats
    min_top1: float  # top-1 agreement over positions where the adapter's top token leads by >= TOP1_MARGIN
    max_effect_fraction: float  # KL(adapter || merged) / KL(adapter || base), checked when the latter is ...
    min_effect: float  # ... at least this large (below it the adapter's effect is within rounding noise)


CHECK_LIMITS = {
    "exact": CheckLimits(max_kl=1e-5, min_top1=0.99, max_effect_fraction=0.01, min_effect=1e-4),
    "16-bit": CheckLimits(max_kl=1e-2, min_top1=0.98, max_effect_fraction=0.1, min_effect=1e-2),
}
TOP1_MARGIN = 0.5  # logits
CHECK_PROMPTS = 8
CHECK_TOKENS = 64
BUILTIN_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. The dog did not move.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "Translate to German: The weather is nice today.\nGerman: Das Wetter ist heute schön.",
    "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144",
)

# safetensors dtype codes
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_CODE_OF = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_NAME_OF = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard: its name, safetensors dtype code, shape and size in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class LayerStat:
    module: str
    delta_rel: float  # ‖ΔW‖ / ‖W‖ (W: the base weight the delta was added to)
    quant_err_rel: float | None  # ‖W − dequant(NF4(W))‖ / ‖ΔW‖, for layers the run held in 4 bits


@dataclass
class CheckResult:
    n_prompts: int
    n_positions: int
    max_abs_logit_diff: float  # merged vs adapter on its base
    mean_kl: float  # KL(adapter || merged), nats per position
    top1_agreement: float  # over all positions
    top1_decisive: float  # over positions where the adapter's top token leads by >= TOP1_MARGIN
    adapter_kl: float  # KL(adapter || base without adapter): how much the adapter changes the model
    adapter_top1: float
    limits: str  # "exact" or "16-bit": which CHECK_LIMITS applied
    prompts_from: str  # "eval data", "training data" or "built-in prompts"
    reference: str  # what the merged model was compared with
    training_kl: float | None = None  # --base-weights original on a 4-bit run: KL(training-time model || merged)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


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
# options


# ---------------------------------------------------------------------------------------------
# reading safetensors without mmap


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file, in file order, and its metadata. Raises ``ModelError``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
            if not 0 < n < 2**30:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    infos = []
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        infos.append(TensorInfo(name, path, entry["dtype"], tuple(entry["shape"]), 8 + n + begin, 8 + n + end))
    infos.sort(key=lambda t: t.start)
    return infos, metadata


def base_shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: the index's shards, else ``model.safetensors``, else all."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise ModelError(f"base model folder {folder} is missing shard {missing[0]} named in {INDEX_FILE}")
        return [folder / f for f in files]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if not files:
        pickles = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        if pickles:
            raise ModelError(
                f"base model folder {folder} has only pickle weights ({pickles[0].name}); merge reads safetensors"
            )
        raise ModelError(f"base model folder {folder} has no weights (*.safetensors)")
    return files


def _readinto(f: BinaryIO, view: memoryview) -> None:
    while view.nbytes:
        got = f.readinto(view)
        if not got:
            raise ModelError(f"{f.name}: file is truncated")
        view = view[got:]


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """One tensor, read into its own buffer (a file read, not a memory map: the pages are ours to free)."""
    dtype = _TORCH_DTYPES.get(info.dtype)
    if dtype is None:
        raise ModelError(
            f"{info.file.name}: tensor {info.name} has dtype {info.dtype}, which merge cannot compute with"
        )
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = bytearray(info.nbytes)
    f.seek(info.start)
    _readinto(f, memoryview(buf))
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(info.shape)


def copy_chunks(f: BinaryIO, info: TensorInfo, out_code: str) -> Iterator[memoryview | bytes]:
    """An untargeted tensor's bytes in chunks: the same bytes when the dtype stays, else cast chunk by chunk."""
    f.seek(info.start)
    item = _ITEMSIZE.get(info.dtype, 8)  # whole elements per chunk when casting
    chunk = max(item, COPY_CHUNK - COPY_CHUNK % item)
    remaining = info.nbytes
    buf = bytearray(min(chunk, remaining))
    while remaining:
        view = memoryview(buf)[: min(chunk, remaining)]
        _readinto(f, view)
        remaining -= view.nbytes
        if out_code == info.dtype:
            yield view
        else:
            t = torch.frombuffer(view, dtype=torch.uint8).view(_TORCH_DTYPES[info.dtype])
            yield tensor_bytes(t.to(_TORCH_DTYPES[out_code]))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes, without a copy when it is contiguous."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


# ---------------------------------------------------------------------------------------------
# writing safetensors as a stream


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor. The header (names, dtypes, shapes, offsets) is laid out
    up front, so no tensor has to wait in memory for the others."""

    def __init__(self, path: Path, entries: list[OutTensor], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        self.sizes: list[tuple[str, int]] = []
        offset = 0
        for t in entries:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            self.sizes.append((t.name, t.nbytes))
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path = path
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, chunks: Iterator[memoryview | bytes] | list[memoryview | bytes]) -> int:
        expected_name, size = self.sizes[self.next]
        assert name == expected_name, (name, expected_name)
        written = 0
        for chunk in chunks:
            try:
                self.f.write(chunk)
            except OSError as e:  # e.g. a full disk: name the file
                e.filename = e.filename or str(self.path)
                raise
            written += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
        if written != size:
            raise RuntimeError(f"{name}: wrote {written} bytes, the header says {size}")
        self.next += 1
        return written

    def close(self) -> None:
        if self.next != len(self.sizes):
            raise RuntimeError(f"{self.path}: {len(self.sizes) - self.next} tensors were not written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def plan_shards(entries: list[OutTensor], max_bytes: int) -> list[list[int]]:
    """Indices of ``entries`` per output shard, in order; a new shard starts when the next tensor would not fit."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(entries):
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += t.nbytes
    return shards


# ---------------------------------------------------------------------------------------------
# which base tensors the adapter changes


@dataclass
class Target:
    module: str  # adapter module path, e.g. model.layers.0.self_attn.q_proj
    tensor: str  # base tensor name
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    conv1d: bool  # the base shard stores this weight (in, out)
    quantized: bool  # the run held this layer in 4 bits


def resolve_base_folder(name: str) -> Path:
    """A local folder for the base: the folder itself, or a hub id's snapshot in the local Hugging Face cache."""
    if is_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"base model folder not found: {name}")
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
        raise ModelError(
            f"base model {name} is not a local folder and is not in the Hugging Face cache; "
            f"download it first (hf download {name}) or pass --base /path/to/model"
        ) from None


def read_base_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise ModelError(f"base model folder {folder} has no config.json")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ModelError(f"{path}: malformed JSON ({e})") from None
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ModelError(
            f"base model {folder} is a pre-quantized ({method}) checkpoint; merge needs the 16-bit original weights"
        )
    return config


def model_skeleton(folder: Path, trust_remote_code: bool) -> Any:
    """The base model's module tree on the meta device (no memory): which layers are Conv1D, their shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read base model {folder}: {str(e).splitlines()[0]}") from None


def not_quantized_modules(skeleton: Any) -> list[str]:
    """Module-name patterns transformers leaves unquantized when it loads a model in 4 bits (the output head,
    tied weights, the model's keep-in-fp32 modules)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        keys = list(get_keys_to_not_convert(skeleton))
    except Exception:  # noqa: BLE001 - private API; fall back to its main rule
        keys = [n for n, m in skeleton.named_modules() if m is output_head(skeleton)]
    keys += list(getattr(skeleton, "_keep_in_fp32_modules", None) or [])
    return keys


def is_quantized_in_training(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return bool(should_convert_module(name, skip))
    except ImportError:  # pragma: no cover - older transformers
        return not any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in skip)


def base_tensor_name(module: str, skeleton: Any, tensors: dict[str, TensorInfo]) -> str | None:
    """The base tensor holding ``module``'s weight: ``<module>.weight``, or that name with the model's
    base-model prefix (``transformer.``, ``model.``) removed or added, as older checkpoints store it."""
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    candidates = [f"{module}.weight"]
    if prefix and module.startswith(prefix + "."):
        candidates.append(f"{module[len(prefix) + 1 :]}.weight")
    elif prefix:
        candidates.append(f"{prefix}.{module}.weight")
    return next((c for c in candidates if c in tensors), None)


def plan_targets(
    adapter_dir: Path,
    adapter_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    skeleton: Any,
    tensors: dict[str, TensorInfo],
    quant: QuantSettings,
) -> tuple[dict[str, Target], float]:
    """{base tensor name: Target} and the scaling, after checking the adapter fits the base exactly.

    Raises ``ModelError`` naming the first module that does not fit (missing, wrong shape, tied, not float).
    """
    settings = settings_from_peft_config(adapter_config)
    where = f"adapter {adapter_dir}"
    fits = f"{where} does not fit the base model"
    saved = adapter_modules(state, where)
    targeted = check_fit(
        saved, settings.r, linear_modules(skeleton), lambda: targeted_modules(skeleton, settings, where), where
    )
    modules = dict(skeleton.named_modules())
    head = output_head(skeleton)
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    skip = not_quantized_modules(skeleton) if quant.load_in_4bit else []
    targets: dict[str, Target] = {}
    for name in targeted:
        module = modules[name]
        n_in, n_out, conv1d = linear_shape(module)
        A, B = saved[name]
        if module is head and tied:
            raise ModelError(
                f"adapter targets {name!r}, whose weight is tied to the input embeddings; merging would change both"
            )
        key = base_tensor_name(name, skeleton, tensors)
        if key is None:
            raise ModelError(f"{fits}: the base model has no weight for module {name!r} (looked for {name}.weight)")
        info = tensors[key]
        need = (n_in, n_out) if conv1d else (n_out, n_in)
        if info.shape != need:
            raise ModelError(f"{fits}: base tensor {key} has shape {info.shape}, the adapter needs {need}")
        if info.dtype not in _FLOAT_CODES:
            raise ModelError(f"base tensor {key} is {info.dtype}; merge needs 16- or 32-bit float base weights")
        quantized = quant.load_in_4bit and is_quantized_in_training(name, skip)
        targets[key] = Target(name, key, A.float(), B.float(), conv1d, quantized)
    return targets, settings.scaling


# ---------------------------------------------------------------------------------------------
# the math


def nf4_roundtrip(weight: torch.Tensor, quant: QuantSettings, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequant(quant(weight)) exactly as the run's 4-bit base held it: ``weight`` (out, in) is cast to the
    compute dtype and quantized with the run's type, double quantization and block size, like transformers
    and bitsandbytes do at load time. Returns the dequantized weight in the compute dtype (those values in
    ``out_dtype`` when given), on weight's device."""
    import bitsandbytes.functional as bnbf

    w = weight.to(DTYPES[quant.compute_dtype]).contiguous()
    if w.device.type == "cpu":  # the same values without bitsandbytes' per-element search (kernels.nf4)
        from qlora_cli.kernels.nf4 import roundtrip_4bit

        return roundtrip_4bit(w, quant.quant_type, quant.double_quant, BNB_BLOCKSIZE, out_dtype)
    packed, state = bnbf.quantize_4bit(
        w, blocksize=BNB_BLOCKSIZE, compress_statistics=quant.double_quant, quant_type=quant.quant_type
    )
    out = bnbf.dequantize_4bit(packed, state)
    return out if out_dtype is None else out.to(out_dtype)


def merged_weight(
    weight: torch.Tensor, target: Target, scaling: float, base_weights: str, quant: QuantSettings, device: torch.device
) -> tuple[torch.Tensor, LayerStat]:
    """(W' = base + scaling · B @ A in float32, in the base shard's layout; its statistics).

    ``weight`` is the base tensor: (out, in), or (in, out) for a Conv1D layer. W' is formed in place in
    one float32 copy of the base weight (``addmm_``), so the peak is a few copies of this one weight.
    """
    A, B = target.lora_A.to(device), target.lora_B.to(device)  # (r, in), (out, r)
    w = weight.to(device)
    w = w.T if target.conv1d else w  # (out, in): the layout bitsandbytes quantized (block boundaries depend on it)
    quant_err = None
    if target.quantized and base_weights == "dequantized":
        base = nf4_roundtrip(w, quant, torch.float32)  # exactly what training saw: see nf4_roundtrip
        quant_err = _distance(w, base)
    else:
        if target.quantized:  # the NF4 error is only reported here, so estimate it on a sample of rows
            quant_err = nf4_error_estimate(w, quant)
        base = w.float()  # a float32 copy (or the float32 base tensor itself, which nothing else needs)
    base_norm = torch.linalg.vector_norm(base).item()
    base.addmm_(B, A, alpha=scaling)  # W' = W + s · (out, r) @ (r, in)
    # ‖s·B A‖_F² = s² · Σ (BᵀB ⊙ A Aᵀ): two (r, r) products instead of the (out, in) delta
    delta_norm = scaling * math.sqrt(max(((B.T @ B) * (A @ A.T)).sum().item(), 0.0))
    stat = LayerStat(
        target.module,
        delta_norm / base_norm if base_norm else math.inf,
        None if quant_err is None else (quant_err / delta_norm if delta_norm else math.inf),
    )
    return (base.T if target.conv1d else base), stat


def nf4_error_estimate(weight: torch.Tensor, quant: QuantSettings, sample: int = 2**18) -> float:
    """‖W − dequant(NF4(W))‖_F for ``weight`` (out, in), estimated from evenly spaced rows holding about
    ``sample`` values (thousands of 64-value NF4 blocks, so within a few percent): each block quantizes
    on its own, so a row subset quantizes like the full tensor (up to the double-quantized block scales)."""
    step = max(1, weight.shape[0] * weight[0].numel() // sample)
    rows = weight[::step]
    error = _distance(rows, nf4_roundtrip(rows, quant))
    return error * math.sqrt(weight.shape[0] / rows.shape[0])


def _distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2**20) -> float:
    """‖a − b‖_F in float32, ~``chunk`` elements at a time (no full-size temporary)."""
    rows = max(1, chunk // max(1, a[0].numel())) if a.ndim else 1
    total = 0.0
    for i in range(0, a.shape[0], rows):
        total += torch.linalg.vector_norm(a[i : i + rows].float() - b[i : i + rows].float()).item() ** 2
    return math.sqrt(total)


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


def merge_run(
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
    run = open_run(run_path, base=base)
    from qlora_cli.adapter_io import read_adapter

    adapter_config, state = read_adapter(run.path)
    folder = resolve_base_folder(run.model.base_model)
    run = replace(run, model=replace(run.model, base_model=str(folder)))
    out = Path(output).expanduser()
    check_output(out, force, [run.path, folder])
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
    del skeleton, state
    main_code = _main_float_code(infos)
    out_code = _CODE_OF[DTYPES[dtype]] if dtype else ("BF16" if main_code in ("F32", "F64") else main_code)
    from qlora_cli.model import load_tokenizer

    tokenizer = load_tokenizer(run.model)

    def planned(t: TensorInfo) -> OutTensor:
        if t.name in targets or (t.dtype == main_code and t.dtype != out_code):
            return OutTensor(t.name, out_code, t.shape, t.numel * _ITEMSIZE[out_code])
        return OutTensor(t.name, t.dtype, t.shape, t.nbytes)  # copied bit for bit

    entries = [planned(t) for t in infos]
    shards = plan_shards(entries, max_bytes)
    total = sum(t.nbytes for t in entries)
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if total > free:
        raise ModelError(f"not enough disk space for {out}: the merged model needs {_gb(total)}, {_gb(free)} free")

    # -- write into a temporary folder beside the output
    console.print(
        f"merging {len(targets)} layers of {run.path} into {folder} ({base_weights} base weights, "
        f"scaling {scaling:g}) -> {out} ({_NAME_OF[out_code]}, {len(shards)} shard(s), {_gb(total)})"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        layers = _write_weights(
            tmp, infos, entries, shards, targets, scaling, base_weights, quant, torch_device, console
        )
        _write_config(tmp, config, _NAME_OF[out_code])
        if (folder / "generation_config.json").exists():
            shutil.copy2(folder / "generation_config.json", tmp / "generation_config.json")
        if run.model.trust_remote_code:
            for py in folder.glob("*.py"):
                shutil.copy2(py, tmp / py.name)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = MergeResult(
        out, _NAME_OF[out_code], base_weights, len(infos), len(targets), len(shards), total, 0.0, layers, None
    )
    console.print(f"[green]wrote[/green] {out} in {time.perf_counter() - started:.1f}s")

    # -- prove it
    if verify:
        need = _check_memory_need(infos)
        have = _available_memory(torch_device)
        if have is not None and need > have:
            result.check_skipped = f"the self-check needs about {_gb(need)} of memory, {_gb(have)} is available"
        else:
            result.check = self_check(run, out, base_weights, torch_device, tokenizer=tokenizer)
    result.seconds = time.perf_counter() - started
    print_report(console, result)
    return result


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
            "pip install 'bitsandbytes>=0.49' (or use --base-weights original)"
        ) from None


def _main_float_code(infos: list[TensorInfo]) -> str:
    by_bytes: dict[str, int] = {}
    for t in infos:
        if t.dtype in _FLOAT_CODES:
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
                        if target is None:
                            settle()
                            writer.write(info.name, copy_chunks(current, info, code))
                        else:
                            weight = read_tensor(current, info)
                            merged, stat = merged_weight(weight, target, scaling, base_weights, quant, device)
                            del weight
                            data = [tensor_bytes(merged.to(_TORCH_DTYPES[code]))]
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


def release_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks of a few MB in its heap, so a loop
    over hundreds of large tensors would otherwise creep up in RSS well past what it holds at any time."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _write_config(folder: Path, config: dict[str, Any], dtype: str) -> None:
    """The base's config.json as it is, minus any quantization_config, with the output dtype."""
    config = dict(config)
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    if "torch_dtype" in config:  # older transformers' name for the same key
        config["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing output (allowed by --force) goes only after."""
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_memory_need(infos: list[TensorInfo]) -> int:
    """Bytes the self-check holds at once: the merged model in float32 (loaded after the reference is freed)."""
    params = sum(t.numel for t in infos if t.dtype in _FLOAT_CODES)
    return int(params * 4 * 1.2)


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# self-check


def check_prompts(
    run: RunFolder, tokenizer: Any, n: int = CHECK_PROMPTS, max_len: int = CHECK_TOKENS
) -> tuple[list[list[int]], str]:
    """(token ids of up to ``n`` prompts, where they came from): the run's eval data, else its training data
    (local files only), else a built-in set. Whole examples (prompt + answer), so the adapter's effect shows."""
    from qlora_cli.data import read_rows, tokenize_row
    from qlora_cli.errors import QLoRAError

    cfg = run.config
    sources = [] if cfg is None else [(cfg.eval_datasets, "eval data"), (cfg.datasets, "training data")]
    for specs, label in sources:
        ids: list[list[int]] = []
        for spec in specs:
            if not Path(spec.path).expanduser().exists():
                continue
            try:
                for row in read_rows(spec)[: n - len(ids)]:
                    ids.append(tokenize_row(row, spec.type, tokenizer, True).input_ids[:max_len])
            except QLoRAError:
                continue
            if len(ids) >= n:
                break
        ids = [i for i in ids if len(i) >= 2]
        if ids:
            return ids, label
    prompts = [list(tokenizer(p)["input_ids"])[:max_len] for p in BUILTIN_PROMPTS[:n]]
    return [p for p in prompts if len(p) >= 2], "built-in prompts"


@torch.no_grad()
def _logits(model: Any, prompts: list[list[int]], device: torch.device, autocast: Any) -> list[torch.Tensor]:
    """Next-token logits at every position of each prompt, float32 on CPU: [(T_i, V)]. One right-padded batch;
    the attention mask keeps the padding out of every real position."""
    T = max(len(p) for p in prompts)
    input_ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with autocast():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    return [logits[i, : len(p)].float().cpu() for i, p in enumerate(prompts)]


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """(max |Δlogit|, mean KL(reference || other) per position, top-1 agreement, top-1 agreement where the
    reference's top token leads by at least ``TOP1_MARGIN``; 1.0 when there is no such position)."""
    ref, oth = torch.cat(reference), torch.cat(other)  # (N, V)
    max_diff = (ref - oth).abs().max().item()
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(oth, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).mean().item()
    agree = ref.argmax(-1) == oth.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= TOP1_MARGIN
    top1_decisive = agree[decisive].float().mean().item() if decisive.any() else 1.0
    return max_diff, kl, agree.float().mean().item(), top1_decisive


def reference_skip_modules(run: RunFolder) -> list[str] | None:
    """Module patterns to keep 16-bit in the self-check's reference, or None when the reference is the
    training-time base itself.

    The merge adds the delta to dequant(NF4(W)) only in the layers the adapter targets and copies every
    other tensor bit for bit, so where the run also held untargeted linear layers in 4 bits, the model the
    merge claims to equal is the training-time base with those layers at their base weights.
    """
    from qlora_cli.adapter_io import read_adapter
    from qlora_cli.lora import linear_module_names

    if not run.model.quant.load_in_4bit:
        return None
    skeleton = model_skeleton(Path(run.model.base_model), run.model.trust_remote_code)
    _, state = read_adapter(run.path)
    targeted = set(adapter_modules(state, f"adapter {run.path}"))
    skip = not_quantized_modules(skeleton)
    untargeted = [
        n
        for n in linear_module_names(skeleton, include_head=True)
        if n not in targeted and is_quantized_in_training(n, skip)
    ]
    return skip + [re.escape(n) for n in untargeted] if untargeted else None


def load_reference(run: RunFolder, device: torch.device, base_weights: str) -> tuple[Any, str, bool]:
    """(the adapter on the base the merged model must equal, what that is, whether it is the training-time
    model). With ``original``: the 16-bit base. With ``dequantized``: the training-time base, except that
    untargeted linear layers keep their base weights (see ``reference_skip_modules``)."""
    from qlora_cli.run_folder import load_adapted_model

    quant = run.model.quant
    if not quant.load_in_4bit:
        return load_adapted_model(run, device)[0], "the adapter on its 16-bit training-time base", True
    if base_weights == "original":
        sixteen = replace(run.model, quant=replace(quant, load_in_4bit=False))
        return load_adapted_model(run, device, model=sixteen)[0], "the adapter on the 16-bit base", False
    skip = reference_skip_modules(run)
    if skip is None:
        return load_adapted_model(run, device)[0], "the adapter on its 4-bit training-time base", True
    return _load_partly_quantized(run, device, skip), "the adapter on its 4-bit base (targeted layers)", False


def _load_partly_quantized(run: RunFolder, device: torch.device, skip: list[str]) -> Any:
    """``load_adapted_model`` with the modules matching ``skip`` left unquantized (in the compute dtype)."""
    from qlora_cli.adapter_io import load_adapter
    from qlora_cli.model import load_base_model

    model = load_base_model(run.model, device, keep_16bit=skip)
    load_adapter(model, run.path)
    return model.eval()


def self_check(
    run: RunFolder, merged_dir: Path, base_weights: str, device: torch.device, tokenizer: Any = None
) -> CheckResult:
    """Run a few prompts through the adapter on its base (``load_reference``) and through the merged model
    loaded by plain transformers in float32; compare the logits. Where the reference is not the training-time
    model (``original``, or untargeted layers the run held in 4 bits), the distance to the training-time
    model is reported too: that gap is quantization error, not a merge error."""
    import gc

    from transformers import AutoModelForCausalLM

    from qlora_cli.lora import lora_disabled
    from qlora_cli.model import load_tokenizer
    from qlora_cli.run_folder import load_adapted_model

    tokenizer = tokenizer or load_tokenizer(run.model)
    prompts, source = check_prompts(run, tokenizer)
    autocast = _autocast(run.model.quant.compute_dtype, device)
    model, what, is_training_model = load_reference(run, device, base_weights)
    ref = _logits(model, prompts, device, autocast)
    with lora_disabled(model):
        base = _logits(model, prompts, device, autocast)
    del model
    training = None
    if not is_training_model:
        model, _ = load_adapted_model(run, device)
        training = _logits(model, prompts, device, autocast)
        del model
    gc.collect()
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, device_map={"": device})
    merged = _logits(merged_model.eval(), prompts, device, nullcontext)
    del merged_model
    gc.collect()

    merged_dtype = json.loads((Path(merged_dir) / "config.json").read_text()).get("dtype")
    exact = run.model.quant.compute_dtype == "float32" and merged_dtype == "float32"
    max_diff, kl, top1, top1_decisive = compare_logits(ref, merged)
    _, adapter_kl, adapter_top1, _ = compare_logits(ref, base)
    result = CheckResult(
        n_prompts=len(prompts),
        n_positions=sum(len(p) for p in prompts),
        max_abs_logit_diff=max_diff,
        mean_kl=kl,
        top1_agreement=top1,
        top1_decisive=top1_decisive,
        adapter_kl=adapter_kl,
        adapter_top1=adapter_top1,
        limits="exact" if exact else "16-bit",
        prompts_from=source,
        reference=what,
        training_kl=None if training is None else compare_logits(training, merged)[1],
    )
    lim = CHECK_LIMITS[result.limits]
    if not math.isfinite(kl) or kl > lim.max_kl:
        result.problems.append(f"mean KL {kl:.3g} > {lim.max_kl:g}")
    if top1_decisive < lim.min_top1:
        result.problems.append(
            f"top-1 agreement {top1_decisive:.1%} < {lim.min_top1:.0%} where the adapter's choice is clear"
        )
    if adapter_kl >= lim.min_effect and kl > lim.max_effect_fraction * adapter_kl:
        result.problems.append(
            f"the merged model is {kl / adapter_kl:.1%} of the adapter's own effect away from the adapter "
            f"(mean KL {kl:.3g} vs {adapter_kl:.3g}; allowed {lim.max_effect_fraction:.0%})"
        )
    return result


def _autocast(compute_dtype: str, device: torch.device) -> Any:
    """Run the reference as training ran it: autocast to the compute dtype unless it is float32."""
    return partial(autocast, compute_dtype, device)


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
