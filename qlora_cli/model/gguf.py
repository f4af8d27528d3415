"""GGUF files as a base model: a ``.gguf`` file (as kept for llama.cpp, Ollama, LM Studio) is checked, then converted
once, tensor by tensor, into a cached safetensors folder dequantized to the compute dtype (``gguf_folder``); from
then on it is loaded like any folder. The ``gguf`` package is imported only here."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qlora_cli.cache import cache_dir
from qlora_cli.config import ModelSettings
from qlora_cli.errors import ModelError
from qlora_cli.layout import MANIFEST, MODEL_WEIGHTS, TOKENIZER_CONFIG

GGUF_MIN_VERSION = "0.13.0"  # 0.11 and older fail under numpy 2 (memmap.newbyteorder); tested 0.13-0.19
GGUF_FORMAT_VERSION = 2  # bump when the converted folder's layout changes: old cache entries are not reused
# (2: manifest.json with sizes and checksums, written last)


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


_gguf_session_depth = 0


@contextmanager
def gguf_session() -> Iterator[None]:
    """Within this block every ``gguf.GGUFReader(path)`` of one path is the same reader, and gguf's tensor
    name maps are computed once. Parsing the header of a 49k-token GGUF takes seconds (its vocabulary is
    read element by element), and transformers parses it anew for the config, the tokenizer and the tensors;
    its name mapping rebuilds gguf's map for every submodule. This keeps a conversion to one parse."""
    global _gguf_session_depth
    import gguf

    if _gguf_session_depth:
        yield
        return
    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(real_name_map)
    _gguf_session_depth += 1
    try:
        yield
    finally:
        _gguf_session_depth -= 1
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _gguf_reader(name: str) -> Any:
    """The GGUF file's reader (memory-mapped: nothing is read but the header). Raises ``ModelError``."""
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"base_model GGUF file not found: {name}")
    if not path.is_file():
        raise ModelError(f"base_model {name} ends in .gguf but is not a file")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(
            f"base_model {name} is a GGUF file; reading it needs the gguf package: pip install 'gguf>={GGUF_MIN_VERSION}'"
        ) from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"base_model {name} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises whatever numpy/struct raise on a cut file
        raise ModelError(f"GGUF file {name} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size or not reader.tensors:
        raise ModelError(
            f"GGUF file {name} is truncated: its tensors need {end:,} bytes, the file has {size:,}"
            if reader.tensors
            else f"GGUF file {name} holds no tensors"
        )
    return reader


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8", "replace") if field.types and field.types[0].name == "STRING" else value


def field_value(field: Any) -> Any:
    """A GGUF metadata field as a Python value: str, bool, int, float or a list of them. (``ReaderField.contents``
    does this in gguf 0.16+; qlora supports 0.13.) Raises ``ModelError`` for text that is not UTF-8."""
    from gguf import GGUFValueType

    types = list(field.types)
    if not types:
        return None

    def one(part: Any, kind: Any) -> Any:
        if kind == GGUFValueType.STRING:
            try:
                return bytes(part).decode("utf-8")
            except UnicodeDecodeError:
                raise ModelError(f"GGUF field {field.name} holds text that is not UTF-8") from None
        value = part[0].item()
        return bool(value) if kind == GGUFValueType.BOOL else value

    if types[0] == GGUFValueType.ARRAY:
        return [one(field.parts[i], types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], types[0])


def check_gguf(name: str, need_tokenizer: bool = True) -> None:
    """Everything that can be wrong with a GGUF base, checked without writing anything (``ModelError``):
    not there, not GGUF, cut short, an architecture transformers cannot read from GGUF, no tokenizer."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        _gguf_reader(name)  # raises the missing-package error after the file checks
    with gguf_session():
        _check_gguf(name, need_tokenizer)


def _check_gguf(name: str, need_tokenizer: bool) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    reader = _gguf_reader(name)
    _check_metadata_sizes(reader, name)  # before transformers parses the header
    architecture = _gguf_field(reader, "general.architecture")
    if architecture is None:
        raise ModelError(f"GGUF file {name} names no architecture (general.architecture)")
    _check_tensors(reader, name)
    try:
        config = _gguf_config(name)
    except ValueError as e:
        if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"GGUF file {name}: architecture {architecture!r} cannot be read from GGUF by transformers "
                f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
            ) from None
        raise ModelError(f"cannot read GGUF file {name}: {str(e).splitlines()[0]}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ModelError(f"GGUF file {name}: {type(config).__name__} ({architecture}) is not a causal language model")
    if need_tokenizer and "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelError(
            f"GGUF file {name} has no tokenizer (no tokenizer.ggml.* metadata); set tokenizer: to a tokenizer folder"
        )
    if need_tokenizer:
        _check_tokenizer(reader, name)


MAX_METADATA_STRING = 1 << 20  # one text value (description, license, chat template); real ones are < 100 KB
TOKENIZER_MODELS = ("gpt2", "llama", "t5", "gemma4")  # what transformers builds a tokenizer from, 5.x
SPECIAL_TOKEN_IDS = ("bos", "eos", "unknown", "padding")  # the ids transformers' GGUF tokenizer reader uses


def _check_metadata_sizes(reader: Any, name: str) -> None:
    """Refuse a text field over ``MAX_METADATA_STRING`` before transformers parses the header: it decodes text
    one byte at a time (a 64 MB description cost minutes and gigabytes) and copies templates into every run."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        types = list(field.types)
        if not types or types[-1] != GGUFValueType.STRING:
            continue
        longest = max((len(field.parts[i]) for i in field.data), default=0)  # views of the map: nothing copied
        if longest > MAX_METADATA_STRING:
            raise ModelError(
                f"GGUF file {name}: metadata field {key} holds {longest / 2**20:.1f} MiB of text (limit "
                f"{MAX_METADATA_STRING >> 20} MiB); remove it (python -m gguf.scripts.gguf_new_metadata IN OUT "
                f"--remove-metadata {key})"
            )


def _check_tensors(reader: Any, name: str) -> None:
    """Every tensor has a size and a type the gguf package can dequantize (I8/I16/I32/I64/F64 and a few quant types
    cannot be); found before anything is converted and cached."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, dequantize

    readable: dict[Any, bool] = {}
    for t in reader.tensors:
        shape = [int(d) for d in t.shape]
        if 0 in shape:
            raise ModelError(f"GGUF file {name}: tensor {t.name} has a zero-sized dimension (shape {shape})")
        kind = t.tensor_type
        if kind not in readable:
            try:
                dequantize(np.zeros((1, GGML_QUANT_SIZES[kind][1]), np.uint8), kind)
                readable[kind] = True
            except (NotImplementedError, KeyError, ValueError):
                readable[kind] = False
        if not readable[kind]:
            raise ModelError(
                f"GGUF file {name}: tensor {t.name} is stored as {kind.name}, which cannot be dequantized "
                "(qlora reads F32, F16, BF16 and llama.cpp's quantized types)"
            )


def _check_tokenizer(reader: Any, name: str) -> None:
    """The tokenizer metadata transformers builds a tokenizer from, checked so that a broken one is one line
    (transformers raises IndexError, KeyError or a bare Exception) and a duplicate token never shifts ids."""

    def value(key: str) -> Any:
        return field_value(reader.fields[key]) if key in reader.fields else None

    fix = "; set tokenizer: to a tokenizer folder"
    tokens = value("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelError(f"GGUF file {name}: tokenizer.ggml.tokens is empty{fix}")
    model = value("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise ModelError(
            f"GGUF file {name}: tokenizer.ggml.model {model!r} is not one transformers builds a tokenizer from "
            f"({', '.join(TOKENIZER_MODELS)}){fix}"
        )
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in reader.fields and len(reader.fields[key].data) != len(tokens):
            raise ModelError(
                f"GGUF file {name}: {key} has {len(reader.fields[key].data)} entries for {len(tokens)} tokens{fix}"
            )
    special: dict[int, str] = {}
    for which in SPECIAL_TOKEN_IDS:
        key = f"tokenizer.ggml.{which}_token_id"
        i = value(key)
        if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
            raise ModelError(f"GGUF file {name}: {key} is {i}, not one of its {len(tokens)} tokens{fix}")
        if i is not None:
            special[i] = which
    ids: dict[str, int] = {}
    twice: list[tuple[str, int, int]] = []
    for i, token in enumerate(tokens):
        if token in ids:
            if i in special or ids[token] in special:  # the special id would name another token than the model's
                raise ModelError(
                    f"GGUF file {name}: tokenizer.ggml.tokens holds {token!r} twice (ids {ids[token]} and {i}), "
                    f"one of them the {special.get(i) or special.get(ids[token])} token{fix}"
                )
            twice.append((token, ids[token], i))
        ids[token] = i
    if twice:  # some published files have them (Gemma 4's QAT GGUFs); the tokenizer keeps the later id
        token, first, second = twice[0]
        _warn(
            f"GGUF file {name}: {len(twice)} token(s) appear twice in tokenizer.ggml.tokens ({token!r}: ids {first} "
            f"and {second}); text is tokenized to the later id"
        )
    merges = value("tokenizer.ggml.merges")
    if model == "gpt2" and not merges:
        raise ModelError(f"GGUF file {name}: a gpt2 (BPE) tokenizer needs tokenizer.ggml.merges{fix}")
    for n, merge in enumerate(merges or []):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ModelError(
                f"GGUF file {name}: tokenizer.ggml.merges[{n}] {merge!r} is not two tokens and a space{fix}"
            )
        unknown = next((t for t in (*parts, "".join(parts)) if t not in ids), None)
        if unknown is not None:
            raise ModelError(
                f"GGUF file {name}: tokenizer.ggml.merges[{n}] {merge!r} names {unknown!r}, which is not in "
                f"tokenizer.ggml.tokens{fix}"
            )


def _gguf_config(name: str) -> Any:
    from transformers import AutoConfig

    path = Path(name).expanduser()
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf_config(name: str) -> Any:
    """The transformers config held in a GGUF file's metadata (nothing converted, nothing written)."""
    with gguf_session():
        check_gguf(name, need_tokenizer=False)
        return _gguf_config(name)


def gguf_cache_folder(name: str, dtype: str) -> Path:
    """Where ``gguf_folder`` keeps the conversion of ``name`` to ``dtype`` (it may not exist yet)."""
    path = Path(name).expanduser().resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{GGUF_FORMAT_VERSION}"
    return cache_dir() / "gguf" / f"{path.stem}-{dtype}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def gguf_folder(name: str, dtype: str, need_tokenizer: bool = True) -> Path:
    """The GGUF file ``name`` as a transformers model folder (config.json, model.safetensors with every tensor
    dequantized to ``dtype``, the tokenizer with its chat template, generation_config.json), converted on
    first use into ``cache_dir()/gguf/`` and reused while the file keeps its path, size and mtime.

    Conversion streams tensor by tensor (the file is memory-mapped, each tensor dequantized, converted and
    appended to disk), so memory holds one tensor at a time, never the whole dequantized model. Nothing is
    written before the file has passed ``check_gguf``; a failed conversion leaves nothing behind.
    """
    if not Path(name).expanduser().is_file():
        check_gguf(name)  # raises the one-line error
    folder = gguf_cache_folder(name, dtype)
    if _unusable(folder, need_tokenizer) is None:
        return folder
    with gguf_session():
        check_gguf(name, need_tokenizer=need_tokenizer)  # nothing is written before the file passes
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _cache_lock(folder):  # one process converts; the others wait for it, then use its folder
            problem = _unusable(folder, need_tokenizer)
            if problem is None:
                return folder
            # cut, overwritten, or converted without the tokenizer this run needs; a run already reading it (another
            # process that did not need the tokenizer) is not protected by the lock, which guards conversion only
            if folder.exists():
                _warn(f"GGUF conversion cache {folder} is damaged or incomplete ({problem}); rebuilding it")
                _discard(folder)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
            try:
                convert_gguf(Path(name).expanduser().resolve(), tmp, getattr(torch, dtype), need_tokenizer)
                write_manifest(tmp)
                os.replace(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return folder


def _unusable(folder: Path, need_tokenizer: bool) -> str | None:
    """Why the converted folder cannot be used as it is (None: it can)."""
    if not folder.exists():
        return "not converted yet"
    problem = cache_problem(folder)
    if problem is None and need_tokenizer and not (folder / TOKENIZER_CONFIG).exists():
        problem = "it holds no tokenizer: it was converted for a run that named its own"
    return problem


@contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock (``flock``) on the conversion of ``folder``, shared by every process on this machine (the
    ranks of one job, runs sharing ``$QLORA_CACHE``). Its small lock file stays: removing it would race."""
    import fcntl

    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def convert_gguf(path: Path, out: Path, dtype: torch.dtype, need_tokenizer: bool = True) -> None:
    """Write ``path`` (GGUF) into the empty folder ``out`` as a transformers model folder, one tensor in memory
    at a time. Names, the q/k un-permutation and other per-architecture fixes are transformers' own
    (``modeling_gguf_pytorch_utils``), applied as ``from_pretrained(gguf_file=...)`` applies them. The file's
    tokenizer is converted too; one that cannot be read is a ``ModelError`` when ``need_tokenizer`` (the run names
    no tokenizer folder of its own), else a warning. A tensor whose shape is not the model's, or that holds NaN or
    infinity, is a ``ModelError``."""
    import numpy as np
    from gguf import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    reader = _gguf_reader(str(path))
    config = _gguf_config(str(path))
    config.dtype = dtype
    if "tokenizer.ggml.tokens" in reader.fields:
        try:
            _check_tokenizer(reader, str(path))
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer.save_pretrained(out)
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception, TypeError, KeyError, IndexError
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if need_tokenizer:
                raise ModelError(f"GGUF file {path}: its tokenizer metadata cannot be read ({reason})") from None
            _warn(f"GGUF file {path}: its own tokenizer is left out of the conversion ({reason})")
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # the metadata as transformers parses it
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    architecture = _gguf_field(reader, "general.architecture")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    shapes = {n: list(p.shape) for n, p in [*skeleton.named_parameters(), *skeleton.named_buffers()]}
    parsed["tensors"] = {}
    code = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    data_path = out / "tensors.tmp"
    with open(data_path, "wb") as data:

        def append(hf_name: str, weights: Any) -> None:
            nonlocal offset
            t = torch.from_numpy(np.array(weights, copy=True)).to(dtype)  # (out, in), as transformers holds it
            if hf_name in shapes and list(t.shape) != shapes[hf_name]:
                raise ModelError(
                    f"GGUF file {path}: the tensor for {hf_name} has shape {list(t.shape)}, its config needs "
                    f"{shapes[hf_name]}"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ModelError(f"GGUF file {path}: the tensor for {hf_name} holds NaN or infinite values")
            raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            data.write(raw)
            header[hf_name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes

        for tensor in reader.tensors:
            weights = dequantize(tensor.data, tensor.tensor_type)  # float32 numpy, (out, in)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
            )
            if result.name in names and result.weights is not None:
                append(names[result.name], result.weights)
            del weights, result
        for hf_name, t in parsed["tensors"].items():  # processors that gather pieces (MoE experts) leave them here
            append(hf_name, t.numpy() if isinstance(t, torch.Tensor) else t)
    expected = {n for n, _ in skeleton.named_parameters()} | {n for n, _ in skeleton.named_buffers()}
    missing = sorted(n for n in expected if n not in header and not _tied(skeleton, n))
    if missing:
        raise ModelError(f"GGUF file {path}: no tensor for {missing[0]} ({len(missing)} missing); cannot convert it")
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / MODEL_WEIGHTS, "wb") as f, open(data_path, "rb") as data:
        f.write(struct.pack("<Q", len(raw)) + raw)
        shutil.copyfileobj(data, f, 16 << 20)
    data_path.unlink()
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    stat = path.stat()
    source = {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": str(dtype)}
    (out / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")


CHUNK = 64 << 20  # model.safetensors is hashed in chunks of this size
FULL_CHECK_BYTES = 2 << 30  # files up to this size are checked whole on every use; larger ones a sample of chunks
SAMPLED_CHUNKS = 4


def _chunk_hashes(path: Path) -> list[str]:
    out = []
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            out.append(hashlib.sha256(chunk).hexdigest())
    return out


def write_manifest(folder: Path) -> None:
    """Record every file of a converted folder (size and per-chunk sha256); written last, so a folder without
    it is incomplete."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _chunk_hashes(p)} for p in sorted(folder.iterdir()) if p.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"format": GGUF_FORMAT_VERSION, "chunk": CHUNK, "files": files}) + "\n")


def cache_problem(folder: Path) -> str | None:
    """What is wrong with a converted folder, or None. Every file's size, and every chunk of files up to
    ``FULL_CHECK_BYTES`` (past that: the first, the last and random ones, ``SAMPLED_CHUNKS`` each use), must match
    the manifest: a truncated or overwritten cache entry is rebuilt, never trained on."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != GGUF_FORMAT_VERSION or MODEL_WEIGHTS not in manifest["files"]:
            return f"its {MANIFEST} is not this version's"
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()))
        if _verified.get(folder) == stamp:  # checked already in this process (train resolves the base twice)
            return None
        for name, entry in manifest["files"].items():
            problem = _file_problem(folder / name, int(entry["size"]), list(entry["sha256"]), int(manifest["chunk"]))
            if problem:
                return problem
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"its {MANIFEST} cannot be read ({type(e).__name__})"
    _verified[folder] = stamp
    return None


_verified: dict[Path, tuple[Any, ...]] = {}


def _file_problem(path: Path, size: int, hashes: list[str], chunk: int) -> str | None:
    import random

    if not path.is_file() or path.stat().st_size != size:
        return f"{path.name} has {path.stat().st_size if path.is_file() else 'no'} bytes, {size} were written"
    picks: Any = range(len(hashes))
    if size > FULL_CHECK_BYTES:
        picks = sorted({0, len(hashes) - 1, *random.sample(range(len(hashes)), min(SAMPLED_CHUNKS, len(hashes)))})
    with open(path, "rb") as f:
        for i in picks:
            f.seek(i * chunk)
            if hashlib.sha256(f.read(chunk)).hexdigest() != hashes[i]:
                return f"{path.name} differs from what was written (bytes {i * chunk:,} to {(i + 1) * chunk:,})"
    return None


def _warn(message: str) -> None:
    """One line on stderr, once per process (the checks run more than once in a run)."""
    import sys

    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"warning: {message}\n")
        sys.stderr.flush()


_warned: set[str] = set()


def _discard(folder: Path) -> None:
    """Move a damaged cache folder aside (a rename: the conversion's own rename then finds the name free),
    then delete it."""
    aside = folder.parent / f".{folder.name}.damaged-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(folder, aside)
    except FileNotFoundError:  # gone already
        return
    shutil.rmtree(aside, ignore_errors=True)


def _tied(model: Any, name: str) -> bool:
    """Whether parameter ``name`` is tied to another one (the output head to the embeddings) or a
    non-persistent buffer: a checkpoint need not hold it."""
    if name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False):
        return True
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf in getattr(module, "_non_persistent_buffers_set", set())


def resolve_gguf(cfg: ModelSettings) -> ModelSettings:
    """``cfg`` with a ``.gguf`` base replaced by its converted folder (dequantized to the compute dtype), whose
    tokenizer is then the default; any other base unchanged."""
    if not is_gguf(cfg.base_model):
        return cfg
    folder = gguf_folder(cfg.base_model, cfg.quant.compute_dtype, need_tokenizer=cfg.tokenizer is None)
    return replace(cfg, base_model=str(folder))
