"""What every command that writes a model file or folder shares: publishing atomically, removing what writers that
died left behind, checking disk and memory first, and sizes as text. ``merge`` and ``export`` both use it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from qlora_cli.errors import ModelError

OWNER_FILE = ".qlora-merge-pid"  # in a temporary folder while its merge runs; gone before it is published


def remove_stale_temp_folders(out: Path) -> None:
    """Delete temporary folders left beside ``out`` by merges that died (``kill -9``, power loss): those whose
    owner process is gone. A merge still running keeps its folder."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int((tmp / OWNER_FILE).read_text())
            os.kill(pid, 0)
            continue  # its merge is still running
        except (OSError, ValueError):
            pass  # no owner file, or no such process
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(old, ignore_errors=True)


def usual_mode(path: Path) -> None:
    """The modes ``mkdir``/``open`` would give under the process umask (0755/0644 for umask 022), instead of
    ``mkdtemp``'s and ``mkstemp``'s 0700/0600, which would make a shared model folder unreadable to others."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing output (allowed by --force) goes only after."""
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    usual_mode(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_disk(out: Path, total: int, what: str) -> None:
    """``ModelError`` when the file system that will hold ``out`` has less than ``total`` bytes free."""
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if total > free:
        raise ModelError(f"not enough disk space for {out}: {what} needs {size_text(total)}, {size_text(free)} free")


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def remove_stale_temp_files(out: Path, mark: str) -> None:
    """Delete temporary files left beside ``out`` by writers (exports) that died (``kill -9``, power loss): those whose
    process is gone. A writer still running keeps its files; ``mark`` separates the name from the pid."""
    for tmp in out.parent.glob(f".{out.name}{mark}*"):
        try:
            pid = int(tmp.name[len(f".{out.name}{mark}") :].split("-")[0])
            os.kill(pid, 0)
            continue  # its writer is still running
        except (OSError, ValueError):
            pass
        tmp.unlink(missing_ok=True)


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
