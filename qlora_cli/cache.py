"""Where qlora keeps what it derives from its inputs (converted GGUF files, ...), reused while the inputs are
unchanged."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where qlora keeps what it derives from inputs: ``$QLORA_CACHE``, else ``$XDG_CACHE_HOME/qlora``."""
    if os.environ.get("QLORA_CACHE"):
        return Path(os.environ["QLORA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora"
