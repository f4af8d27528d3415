"""Reading dataset rows: JSONL, JSON, CSV and Parquet files (any text encoding), and what ``datasets.load_dataset``
reads (hub names, saved dataset folders, a subset, data files, a split, a revision), each as ``Row``s that
know where they came from for error messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_cli.config import CHAT_TYPES, DATA_EXTENSIONS, DatasetSpec
from qlora_cli.errors import DataError


@dataclass
class Row:
    where: str  # "data/train.jsonl:12", for error messages
    fields: dict[str, Any]
    chat: Any = field(default=None, repr=False, compare=False)  # chat and sharegpt rows: data.chat.ChatOptions


def read_rows(spec: DatasetSpec) -> list[Row]:
    """Every row of one dataset entry (the first ``max_samples``), with a location for error messages.
    Raises ``DataError``."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        hub_only = [k for k in ("name", "data_files", "revision") if getattr(spec, k) is not None]
        if hub_only:
            raise DataError(
                f"dataset {spec.path}: {', '.join(hub_only)} apply to hub datasets and dataset folders, not to a file"
            )
        suffix = path.suffix.lower()
        if suffix not in DATA_EXTENSIONS:
            raise DataError(
                f"unsupported dataset file extension '{path.suffix}' in {spec.path} (use {', '.join(DATA_EXTENSIONS)})"
            )
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        rows = readers[suffix](path)[: spec.max_samples]
    elif path.is_dir():
        rows = _read_hub(spec, folder=path)
    elif path.suffix.lower() in DATA_EXTENSIONS or spec.path.startswith((".", "/", "~")) or spec.path.count("/") > 1:
        raise DataError(f"dataset file not found: {spec.path}")
    else:
        rows = _read_hub(spec)
    if not rows:
        raise DataError(f"dataset {spec.path} has no rows")
    if spec.type in CHAT_TYPES:  # the dataset's role map and tools travel with its rows
        from qlora_cli.data.chat_options import options_for

        options = options_for(spec, None)
        for row in rows:
            row.chat = options
    return rows


def text_encoding(path: Path) -> str:
    """``utf-8``, or what a byte-order mark says (``utf-8-sig``, ``utf-16``, ``utf-32``): Windows tools write
    UTF-16 with a BOM. Anything else must be UTF-8; ``_text_lines`` names the file when it is not."""
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if head.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    # no mark: JSON starts with an ASCII character, so NULs beside it tell UTF-16/32 and the byte order (RFC 4627)
    if len(head) == 4 and head[0] and not any(head[1:]):
        return "utf-32-le"
    if len(head) == 4 and head[3] and not any(head[:3]):
        return "utf-32-be"
    if len(head) >= 2 and head[0] and not head[1]:
        return "utf-16-le"
    if len(head) >= 2 and head[1] and not head[0]:
        return "utf-16-be"
    return "utf-8"


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, decoded as ``text_encoding`` says. Raises ``DataError``."""
    lineno = 0
    try:
        with path.open(encoding=text_encoding(path)) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (undecodable byte 0x{e.object[e.start]:02x} after line {lineno}); "
            "save it as UTF-8 (or UTF-16 with a byte-order mark)"
        ) from None


def jsonl_row(where: str, line: str) -> Row:
    """One JSONL line as a ``Row``; ``DataError`` naming ``where`` for a line that is not a JSON object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return Row(where, obj)


def _read_jsonl(path: Path) -> list[Row]:
    return [jsonl_row(f"{path}:{lineno}", line) for lineno, line in _text_lines(path) if line.strip()]


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads("".join(line for _, line in _text_lines(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    rows = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(item).__name__}")
        rows.append(Row(f"{path}[{i}]", item))
    return rows


def _read_csv(path: Path) -> list[Row]:
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(path)
    except Exception as e:  # pyarrow raises ArrowInvalid with a useful message
        raise DataError(f"{path}: cannot read CSV: {str(e).splitlines()[0]}") from None
    return [Row(f"{path}:{i + 2}", r) for i, r in enumerate(table.to_pylist())]  # line 1 is the header


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet: {str(e).splitlines()[0]}") from None
    return [Row(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]


def load_dataset_kwargs(spec: DatasetSpec) -> dict[str, Any]:
    """The arguments ``datasets.load_dataset`` gets for a hub dataset or folder: only those the entry sets."""
    kwargs: dict[str, Any] = {"split": spec.split}
    for key in ("name", "data_files", "revision"):
        if getattr(spec, key) is not None:
            kwargs[key] = getattr(spec, key)
    return kwargs


def _read_hub(spec: DatasetSpec, folder: Path | None = None) -> list[Row]:
    """Rows of a hub dataset or a local dataset folder: a folder written by ``save_to_disk`` is read with
    ``load_from_disk``, any other folder (data files, a README with configs) and a hub name with
    ``load_dataset``, which gets the entry's ``name``, ``data_files``, ``split`` and ``revision``."""
    what = f"dataset folder {spec.path}" if folder else f"dataset {spec.path!r} is not a local file and"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the datasets library, which is not installed") from None
    saved = folder is not None and ((folder / "dataset_dict.json").exists() or (folder / "state.json").exists())
    try:
        if saved:
            if spec.name is not None or spec.data_files is not None or spec.revision is not None:
                raise DataError(
                    f"dataset folder {spec.path} was written by save_to_disk: it has no subsets (name), "
                    "data_files or revision; remove them from the dataset entry"
                )
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise DataError(f"dataset folder {spec.path} has no split {spec.split!r} (it has {', '.join(ds)})")
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(str(folder) if folder else spec.path, **load_dataset_kwargs(spec))
    except DataError:
        raise
    except Exception as e:
        could_not = "could not be loaded" if folder else "could not be loaded from the hub"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{what} {could_not}: {first}") from None
    if spec.max_samples is not None and spec.max_samples < len(ds):
        ds = ds.select(range(spec.max_samples))
    return [Row(f"{spec.path}[{spec.split}][{i}]", dict(r)) for i, r in enumerate(ds)]
