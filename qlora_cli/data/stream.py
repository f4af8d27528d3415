"""Training data larger than memory (``streaming: true``): JSONL files read a block of rows at a time.

    datasets (JSONL files, in order)
        │  a block of ``stream_block_rows`` rows read from a byte offset (never the whole file)
        ▼  tokenized as any dataset entry is (through the tokenization cache: one cache entry per block)
    block examples (packed into rows of sequence_len when sample_packing)
        │  shuffled by (seed, epoch, block), cut into micro-batches and optimizer steps
        ▼
    the training loop, one optimizer step at a time

The position of the next step is (dataset, byte offset of its block, line number, steps of that block done);
the checkpoint holds it, so a resumed run reads that block again and goes on from the same example. Memory
holds one block of rows and its examples, whatever the size of the files. An epoch ends with the last file; the
run's length is ``max_steps`` (a stream's length is not known up front).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.config import CHAT_TYPES, DatasetSpec, DataSettings
from qlora_cli.data.examples import Example
from qlora_cli.data.sources import Row, jsonl_row
from qlora_cli.errors import DataError

START = (0, 0, 1, 0)  # dataset, byte offset, line number, steps of the block done


def read_block(spec: DatasetSpec, offset: int, line: int, n: int) -> tuple[list[Row], int, int]:
    """Up to ``n`` rows of a JSONL file from byte ``offset`` (line number ``line``): (rows, the offset and line
    after them). ``DataError`` naming file and line for a line that is not a JSON object or not UTF-8."""
    path = Path(spec.path).expanduser()
    rows: list[Row] = []
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"dataset {spec.path}: cannot read it ({e.strerror or e})") from None
    with f:
        f.seek(offset)
        while len(rows) < n:
            raw = f.readline()
            if not raw:
                break
            where = f"{spec.path}:{line}"
            line += 1
            try:
                text = raw.decode("utf-8-sig" if offset == 0 and line == 2 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text (streaming reads UTF-8 JSONL)") from None
            if text.strip():
                rows.append(jsonl_row(where, text))
        return rows, f.tell(), line


def scan(specs: list[DatasetSpec], chunk_rows: int = 50_000) -> int:
    """Read every streamed file once before training, a chunk at a time, so that a malformed line is one
    ``error:`` line before anything is written rather than a stop mid-run: each line must be a JSON object with
    its type's fields. Returns the number of rows."""
    from qlora_cli.data.pipeline import REQUIRED_FIELDS

    total = 0
    for spec in specs:
        need = REQUIRED_FIELDS.get(spec.type, ())
        offset, line, rows_here = 0, 1, 0
        while True:
            rows, offset, line = read_block(spec, offset, line, chunk_rows)
            if not rows:
                break
            rows_here += len(rows)
            for row in rows:
                keys = row.fields.keys()
                if spec.type in CHAT_TYPES:
                    if "messages" not in keys and "conversations" not in keys:
                        raise DataError(f"{row.where}: row is missing field 'messages' (or ShareGPT's 'conversations')")
                elif any(k not in keys for k in need):
                    missing = next(k for k in need if k not in keys)
                    raise DataError(
                        f"{row.where}: row is missing field '{missing}' (type {spec.type} needs {', '.join(need)})"
                    )
        if not rows_here:
            raise DataError(f"dataset {spec.path} has no rows")
        total += rows_here
    return total


@dataclass
class StreamData:
    """The training datasets as a stream of optimizer steps (``windows``), one block of rows in memory."""

    specs: list[DatasetSpec]
    tokenizer: Any
    settings: DataSettings
    block_rows: int
    packing: bool
    micro_batch_size: int
    per_step: int  # micro-batches per optimizer step (accumulation x processes)

    def __post_init__(self) -> None:
        self._last: tuple[tuple[int, int], Any] | None = None  # the block read last: the first, read by the data
        # checks, is not tokenized twice

    def block(self, index: int, offset: int, line: int) -> tuple[list[list[Example]], int, int, int]:
        """(the block's training rows (packs, or one example each), rows read, offset and line after it)."""
        if self._last is not None and self._last[0] == (index, offset):
            return self._last[1]
        result = self._read(index, offset, line)
        self._last = ((index, offset), result)
        return result

    def _read(self, index: int, offset: int, line: int) -> tuple[list[list[Example]], int, int, int]:
        from qlora_cli.data.pipeline import pack_examples, tokenize_block

        spec = self.specs[index]
        rows, end, after = read_block(spec, offset, line, self.block_rows)
        if not rows:
            return [], 0, end, after
        if spec.type in CHAT_TYPES:
            from qlora_cli.data.chat_options import options_for

            options = options_for(spec, None)
            for row in rows:
                row.chat = options
        examples = tokenize_block(spec, rows, self.tokenizer, self.settings)
        if self.packing:
            units = [[examples[i] for i in pack] for pack in pack_examples(examples, self.settings.sequence_len)]
        else:
            units = [[e] for e in examples]
        return units, len(rows), end, after

    def first_examples(self) -> list[Example]:
        """The first block's examples (the data checks and the report look at them)."""
        for index in range(len(self.specs)):
            units, _, _, _ = self.block(index, 0, 1)
            if units:
                return [e for unit in units for e in unit]
        raise DataError("the streamed datasets hold no training examples")

    def windows(
        self, epoch: int, position: tuple[int, int, int, int], seed: int
    ) -> Iterator[tuple[list[list[list[Example]]], int, tuple[int, int, int, int]]]:
        """From ``position`` of ``epoch`` on, forever: (an optimizer step's micro-batches, and the epoch and
        position of the step after it)."""
        from qlora_cli.data.pipeline import epoch_batches

        index, offset, line, done = position
        empty_epochs = 0
        while True:
            if index >= len(self.specs):  # the last file ended: the next epoch starts at the first
                epoch, index, offset, line, done = epoch + 1, 0, 0, 1, 0
                empty_epochs += 1
                if empty_epochs > 1:
                    raise DataError("the streamed datasets hold no training examples")
            units, n_rows, end, after = self.block(index, offset, line)
            if not n_rows:
                index, offset, line, done = index + 1, 0, 1, 0
                continue
            batches = epoch_batches(len(units), self.micro_batch_size, seed * 7919 + index * 104729 + offset, epoch)
            steps = [batches[i : i + self.per_step] for i in range(0, len(batches), self.per_step)]
            for k in range(done, len(steps)):
                empty_epochs = 0
                following = (index, offset, line, k + 1) if k + 1 < len(steps) else (index, end, after, 0)
                yield [[units[i] for i in idx] for idx in steps[k]], epoch, following
            index, offset, line, done = index, end, after, 0
