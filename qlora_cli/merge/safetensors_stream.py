"""Safetensors shards read with plain file reads (no mmap) and written as a stream: one tensor at a time,
headers planned from the input headers, so memory never holds a shard."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qlora_cli.errors import ModelError
from qlora_cli.layout import ADAPTER_WEIGHTS, MODEL_WEIGHTS

INDEX_FILE = "model.safetensors.index.json"  # which shard holds which tensor
COPY_CHUNK = 64 * 2**20  # bytes per read when copying an untargeted tensor
# safetensors dtype codes
DTYPE_OF_CODE = {
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
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
CODE_OF_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
NAME_OF_CODE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard: its name, safetensors dtype code, shape and size in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


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
    if (folder / MODEL_WEIGHTS).exists():
        return [folder / MODEL_WEIGHTS]
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS)
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
    dtype = DTYPE_OF_CODE.get(info.dtype)
    if dtype is None:
        raise ModelError(
            f"{info.file.name}: tensor {info.name} has dtype {info.dtype}, which merge cannot compute with"
        )
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)  # not zero-filled, unlike a bytearray: the read fills it
    f.seek(info.start)
    _readinto(f, memoryview(buf.numpy()))
    return buf.view(dtype).reshape(info.shape)


def copy_chunks(f: BinaryIO, info: TensorInfo, out_code: str) -> Iterator[memoryview | bytes]:
    """An untargeted tensor's bytes in chunks: the same bytes when the dtype stays, else cast chunk by chunk."""
    f.seek(info.start)
    item = ITEMSIZE.get(info.dtype, 8)  # whole elements per chunk when casting
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
            t = torch.frombuffer(view, dtype=torch.uint8).view(DTYPE_OF_CODE[info.dtype])
            yield tensor_bytes(t.to(DTYPE_OF_CODE[out_code]))


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
