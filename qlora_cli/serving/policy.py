"""What ``qlora serve`` lets a client do: decided by the operator's command line, never by a request or a folder.

    ServePolicy          the operator's choices (remote code, runtime loading and its roots, API key, limits)
    confine_lora_path    a client's ``lora_path`` -> a resolved folder under an allowed root, or a refusal
    ApiKeyMiddleware     ``Authorization: Bearer <key>`` on every endpoint but ``/health``, compared in constant time

A refusal sent to a client says what was wrong in generic terms: it never echoes what a file holds and never
tells whether a path exists outside the roots. The details go to the server's log, for the operator.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE, TOKENIZER_CONFIG

log = logging.getLogger("qlora.serve")

# files a runtime adapter folder may hold that the server reads, and the most bytes it reads of each
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json, qlora_config.yaml, tokenizer_config.json: text, a few KB
MAX_SAFETENSORS_HEADER = 16 << 20  # a safetensors header lists tensors; 16 MB is ~100k tensors


class PolicyError(Exception):
    """A client request the policy refuses: ``status`` and a message that is safe to send back."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServePolicy:
    """The operator's choices for one server (from ``qlora serve``'s flags)."""

    trust_remote_code: bool = False  # the base's own code (operator-named models only; never a client's folder)
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    lora_roots: tuple[Path, ...] = ()  # runtime lora_path must resolve under one of these
    api_key: str | None = None
    max_lora_rank: int = 64
    max_loras: int = 16

    def __post_init__(self) -> None:
        if self.allow_runtime_lora and not self.lora_roots:
            raise ValueError("--allow-runtime-lora needs at least one --lora-root DIR to load adapters from")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key (or QLORA_API_KEY) must not be empty")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            # a client's header is stripped by HTTP itself, so such a key could never match
            raise ValueError("--api-key (or QLORA_API_KEY) has leading or trailing whitespace; remove it")


def resolve_roots(roots: list[str] | tuple[str, ...]) -> tuple[Path, ...]:
    """Operator-given root folders, resolved (symlinks followed); each must be an existing folder."""
    out = []
    for root in roots:
        p = Path(root).expanduser()
        if not p.is_dir():
            raise ValueError(f"--lora-root {root}: not a folder")
        out.append(p.resolve())
    return tuple(out)


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


REFUSED = "lora_path is not an adapter folder this server may load"


def confine_lora_path(lora_path: str, roots: tuple[Path, ...]) -> Path:
    """The folder ``lora_path`` names, resolved with symlinks, when it lies under one of ``roots`` and every
    entry in it stays there too. A relative path is looked up under each root in turn. Raises ``PolicyError``
    with one message for every refusal (missing, outside, not a folder): a client cannot probe the disk."""
    if "\x00" in lora_path:
        raise PolicyError(REFUSED)
    given = Path(lora_path).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        try:
            folder = candidate.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a symlink loop
            continue
        if not folder.is_dir() or not _under(folder, roots):
            continue
        try:
            escapes = [e.name for e in folder.iterdir() if e.is_symlink() and not _under(e.resolve(), roots)]
        except OSError:
            continue
        if escapes:
            log.warning("refused lora_path %s: %s links outside the allowed roots", folder, escapes[0])
            continue
        return folder
    log.warning("refused lora_path %r: not a folder under %s", lora_path, ", ".join(map(str, roots)))
    raise PolicyError(REFUSED)


def check_file_sizes(folder: Path) -> None:
    """Refuse, before reading them, config files over ``MAX_CONFIG_BYTES`` and a safetensors file whose header
    claims more than ``MAX_SAFETENSORS_HEADER`` bytes (or more than the file holds). Raises ``PolicyError``."""
    for name in (ADAPTER_CONFIG, CONFIG_FILE, TOKENIZER_CONFIG, "special_tokens_map.json"):
        f = folder / name
        if f.is_file() and f.stat().st_size > MAX_CONFIG_BYTES:
            log.warning("refused %s: %d bytes", f, f.stat().st_size)
            raise PolicyError(f"the adapter's {name} is larger than {MAX_CONFIG_BYTES >> 20} MB")
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        size = weights.stat().st_size
        with open(weights, "rb") as fh:
            head = fh.read(8)
        header = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header < 2 or header > MAX_SAFETENSORS_HEADER or 8 + header > size:
            log.warning("refused %s: header length %d, file %d bytes", weights, header, size)
            raise PolicyError("adapter_model.safetensors is not a valid safetensors file")


# ---------------------------------------------------------------------------------------------
# authentication


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


class ApiKeyMiddleware:
    """ASGI middleware: every HTTP request but ``GET /health`` needs ``Authorization: Bearer <key>``.

    Both sides are hashed before ``hmac.compare_digest``, so the time taken does not depend on the key's
    length or on how many leading characters a guess gets right. A pure ASGI wrapper (not Starlette's
    ``BaseHTTPMiddleware``) so streaming responses and client disconnects pass through untouched."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.want = _digest(api_key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        body = {
            "error": {
                "message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        header = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        ok = hmac.compare_digest(_digest(token.strip()), self.want)
        return ok and scheme.lower() == b"bearer"


# every file transformers' AutoTokenizer may read from a local tokenizer folder (5.x)
TOKENIZER_READS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "config.json",
)
TEMPLATE_DIR = "additional_chat_templates"
MAX_TOKENIZER_BYTES = 64 << 20


def confined_file(path: Path, roots: tuple[Path, ...], max_bytes: int | None = None) -> Path | None:
    """None when ``path`` is absent; else the regular file it resolves to, which must lie under a root (and hold
    at most ``max_bytes``). Raises ``PolicyError`` for a file outside the roots, a FIFO or device, a loop."""
    if not os.path.lexists(path):
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        real = None
    if real is None or not _under(real, roots) or not real.is_file():
        log.warning("refused %s: not a regular file under the allowed roots", path)
        raise PolicyError(REFUSED)
    if max_bytes is not None and real.stat().st_size > max_bytes:
        log.warning("refused %s: %d bytes", path, real.stat().st_size)
        raise PolicyError(f"the adapter's {path.name} is larger than {max_bytes >> 20} MB")
    return real


def _read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, opened without blocking and checked to be a regular file on the open descriptor (a
    file swapped for a named pipe after ``confined_file`` looked at it is refused, never waited on)."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("refused %s: not a regular file", path)
            raise PolicyError(REFUSED)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise PolicyError(f"the adapter's {path.name} is larger than {max_bytes >> 20} MB")
    return data


def private_tokenizer(folder: Path, roots: tuple[Path, ...], into: Path) -> bool:
    """Copy ``folder``'s tokenizer files, each checked by ``confined_file``, into ``into``, a private folder the
    tokenizer is then loaded from: transformers reads nothing else. ``fast_tokenizer_files`` (names of other
    tokenizer files, "../" allowed) is dropped from tokenizer_config.json. Whether any file was copied."""
    copied = False
    names = list(TOKENIZER_READS)
    if (folder / TEMPLATE_DIR).is_dir():
        (into / TEMPLATE_DIR).mkdir()
        names += [f"{TEMPLATE_DIR}/{p.name}" for p in (folder / TEMPLATE_DIR).glob("*.jinja")]
    for name in names:
        real = confined_file(folder / name, roots, MAX_TOKENIZER_BYTES)
        if real is None:
            continue
        data = _read_regular(real, MAX_TOKENIZER_BYTES)
        if name == TOKENIZER_CONFIG:
            try:
                config = json.loads(data.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise PolicyError("the adapter's tokenizer_config.json is not a JSON object") from None
            if not isinstance(config, dict):
                raise PolicyError("the adapter's tokenizer_config.json is not a JSON object")
            config.pop("fast_tokenizer_files", None)
            (into / name).write_text(json.dumps(config), encoding="utf-8")
        else:
            (into / name).write_bytes(data)
        copied = True
    return copied
