"""User-facing errors.

Anything raised as a ``QLoRAError`` is a mistake the user can fix (a bad config key, a missing file, a
malformed data row). The CLI prints its message as one line and exits with code 2. Any other exception
is a bug in qlora and keeps its traceback.
"""

from __future__ import annotations


class QLoRAError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2


class ConfigError(QLoRAError):
    """The YAML config or a ``--set`` override is invalid."""


class DataError(QLoRAError):
    """A dataset file is missing, malformed or yields nothing to train on."""


class ModelError(QLoRAError):
    """The base model, tokenizer or adapter cannot be used as asked."""
