"""``qlora serve``: an OpenAI-compatible HTTP server for many adapters on one (4-bit) base.

    GET  /health                      {"status": "ok"}
    GET  /v1/models                   the base and every loaded adapter
    POST /v1/completions              OpenAI completions (``stream: true`` -> server-sent events)
    POST /v1/chat/completions         OpenAI chat completions, through the adapter's chat template
    POST /v1/load_lora_adapter        {"lora_name", "lora_path"}   (vLLM's shape)
    POST /v1/unload_lora_adapter      {"lora_name"}

``model`` names an adapter, or the base: by its folder name (``llama-3.1-8b`` for ``./models/llama-3.1-8b``) or
``base``. The base is loaded once, quantized as the adapters were trained (read from their run folders), and
one scheduler thread decodes every running request together: rows for different adapters share each forward
(``MultiLoRA``), new requests join between steps, and a client that goes away only loses its own row.

``ModelServer`` is the model side (no HTTP): tests and the benchmark drive it directly; ``create_app`` wraps
it in FastAPI. fastapi and uvicorn are imported only here, with a one-line error when missing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qlora_cli.config import ModelSettings, QuantSettings
from qlora_cli.errors import ModelError, QLoRAError
from qlora_cli.generation import Engine, SamplingParams, Scheduler, Sequence, end_of_turn_ids, eos_ids
from qlora_cli.multi_lora import BASE_ONLY, MultiLoRA
from qlora_cli.serve_policy import (
    ApiKeyMiddleware,
    PolicyError,
    ServePolicy,
    check_file_sizes,
    confine_lora_path,
    log,
)

try:  # at module level, so FastAPI can resolve the handlers' `request: Request` annotation
    from starlette.requests import Request
except ImportError:  # no web stack: create_app says so (require_web_stack)
    Request = Any  # type: ignore[misc,assignment]

BASE_ALIAS = "base"
DEFAULT_QUANT = QuantSettings()  # a base served with no adapter: qlora's default


class RequestError(QLoRAError):
    """A request the server refuses: HTTP ``status`` with an OpenAI-shaped error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# ---------------------------------------------------------------------------------------------
# the model side


@dataclass
class Served:
    """One name the server answers to: the base, or an adapter with its tokenizer (its chat template)."""

    name: str
    slot: int
    tokenizer: Any
    path: str
    created: int
    eos_ids: frozenset[int]
    end_of_turn_ids: frozenset[int]


def parse_adapter_arg(item: str) -> tuple[str, str]:
    """``name=path`` -> (name, path); a bare path is named after its folder."""
    name, sep, path = item.partition("=")
    if not sep:
        path, name = item, Path(item.rstrip("/")).name
    name, path = name.strip(), path.strip()
    if not name or not path:
        raise ModelError(f"--adapter expects name=path, got {item!r}")
    return name, path


def same_model(a: str, b: str) -> bool:
    """Two base-model names that point to the same model (local paths are compared resolved)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


class ModelServer:
    """One base model, the adapters on it, and the scheduler that decodes every request."""

    def __init__(
        self,
        base: str | None = None,
        adapters: list[tuple[str, str]] | None = None,
        device: str = "auto",
        max_batch_size: int = 8,
        base_name: str | None = None,
        policy: ServePolicy | None = None,
    ):
        from qlora_cli.model import DTYPES, load_base_model, load_tokenizer, resolve_device
        from qlora_cli.run_folder import open_run

        self.policy = policy = policy or ServePolicy()
        adapters = adapters or []
        if not base and not adapters:
            raise ModelError("nothing to serve: pass --base and/or --adapter name=path")
        names = [n for n, _ in adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ModelError(f"adapter name {dupes[0]!r} is given twice")
        if len(adapters) > policy.max_loras:
            raise ModelError(f"{len(adapters)} adapters given; --max-loras is {policy.max_loras}")
        # whether any model code runs is the operator's flag, whatever a run folder's config says
        runs = [(name, self._operator_run(open_run(path, base=base))) for name, path in adapters]
        settings = self._base_settings(base, runs)
        self.settings = settings
        self.base_model = settings.base_model
        self.base_name = base_name or Path(settings.base_model.rstrip("/")).name or settings.base_model
        self.device = resolve_device(device)
        self.model = load_base_model(settings, self.device)
        self.model.eval()
        self.multi = MultiLoRA(self.model)
        dtype = DTYPES[settings.quant.compute_dtype]
        self.engine = Engine(self.model, self.multi, max_batch_size=max_batch_size, compute_dtype=dtype)
        self.max_length = self.engine.max_length
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        base_tokenizer = load_tokenizer(replace(settings, tokenizer=None, chat_template=None))
        self.served: dict[str, Served] = {}
        self._lock = threading.Lock()
        self.served[self.base_name] = self._served(self.base_name, BASE_ONLY, base_tokenizer, settings.base_model)
        for name, run in runs:
            self._add(name, run, load_tokenizer(run.model))
        self.scheduler = Scheduler(self.engine).start()

    def _operator_run(self, run: Any) -> Any:
        return replace(run, model=replace(run.model, trust_remote_code=self.policy.trust_remote_code))

    def _base_settings(self, base: str | None, runs: list[tuple[str, Any]]) -> ModelSettings:
        """How to load the base: the adapters' base and quantization, which must agree."""
        if not runs:
            return ModelSettings(
                base_model=str(base), quant=DEFAULT_QUANT, trust_remote_code=self.policy.trust_remote_code
            )
        first_name, first = runs[0]
        for name, run in runs[1:]:
            if not same_model(run.model.base_model, first.model.base_model):
                raise ModelError(
                    f"adapters {first_name!r} and {name!r} were trained on different base models "
                    f"({first.model.base_model} vs {run.model.base_model}); one server serves one base"
                )
        # a plain PEFT folder records no quantization: it fits whatever the run folders say (default: qlora's)
        recorded = [(name, run) for name, run in runs if run.config is not None]
        if not recorded:
            return replace(first.model, tokenizer=None, quant=DEFAULT_QUANT)
        first_name, first = recorded[0]
        for name, run in recorded[1:]:
            if run.model.quant != first.model.quant:
                raise ModelError(
                    f"adapters {first_name!r} and {name!r} were trained on differently quantized bases "
                    f"({describe_quant(first.model.quant)} vs {describe_quant(run.model.quant)}); one server "
                    "serves one base"
                )
        return replace(first.model, tokenizer=None)

    def _served(self, name: str, slot: int, tokenizer: Any, path: str) -> Served:
        tokenizer.padding_side = "left"
        return Served(
            name, slot, tokenizer, path, int(time.time()), eos_ids(tokenizer, self.model), end_of_turn_ids(tokenizer)
        )

    def _add(self, name: str, run: Any, tokenizer: Any) -> None:
        if name in (BASE_ALIAS, self.base_name):
            raise ModelError(f"adapter name {name!r} is taken by the base model; pick another")
        if run.config is not None and run.model.quant != self.settings.quant:
            raise ModelError(
                f"adapter {name!r} was trained on a base quantized as {describe_quant(run.model.quant)}; this "
                f"server runs {describe_quant(self.settings.quant)}"
            )
        if len(tokenizer) > self.model.get_input_embeddings().num_embeddings:
            raise ModelError(f"adapter {name!r}: its tokenizer has more tokens than the base model's embeddings")
        rank = run.adapter_config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ModelError(f"adapter {name!r}: adapter_config.json has no valid rank 'r'")
        if rank > self.policy.max_lora_rank:
            raise ModelError(
                f"adapter {name!r} has rank {rank}; this server's --max-lora-rank is {self.policy.max_lora_rank}"
            )
        adapter = self.multi.load(name, run.path)
        self.served[name] = self._served(name, adapter.slot, tokenizer, str(run.path))

    # -- run-time adapter management ---------------------------------------------------------------
    def load_adapter(self, name: str, lora_path: str) -> None:
        """Load a client-named adapter folder under ``name`` while serving (``--allow-runtime-lora``).

        The folder must resolve under an operator's ``--lora-root``. Only its adapter files, the quantization
        its run recorded and its own tokenizer files (read with no remote code) are used: the base model, the
        tokenizer path and every loading policy stay the server's. Raises ``RequestError`` with a message that
        names no server path and echoes nothing from the folder's files; details go to the server's log."""
        from qlora_cli.model import load_tokenizer

        if not self.policy.allow_runtime_lora:
            raise RequestError(RUNTIME_LORA_OFF, 403, None, "runtime_lora_disabled")
        if not name or not name.strip():
            raise RequestError("lora_name must not be empty", param="lora_name")
        try:
            folder = confine_lora_path(lora_path, self.policy.lora_roots)
            check_file_sizes(folder)
        except PolicyError as e:
            raise RequestError(str(e), e.status, "lora_path", "invalid_adapter") from None
        with self._lock:
            if name in self.served or name == BASE_ALIAS:
                raise RequestError(f"a model named {name!r} is already being served", param="lora_name")
            if len(self.multi.adapters) >= self.policy.max_loras:
                raise RequestError(
                    f"this server holds at most {self.policy.max_loras} adapters (--max-loras); unload one first",
                    param="lora_name",
                )
            run = self._runtime_run(folder)
            try:
                tokenizer = load_tokenizer(run.model)
            except Exception as e:  # noqa: BLE001 - any failure reading a client's tokenizer files is a refusal
                log.warning("runtime adapter %s: tokenizer: %s", folder, e)
                raise RequestError("the adapter folder's tokenizer cannot be loaded", param="lora_path") from None
            try:
                self._add(name, run, tokenizer)
            except ModelError as e:
                log.warning("runtime adapter %s: %s", folder, e)
                raise RequestError(_generic_fit_error(str(e)), param="lora_path", code="invalid_adapter") from None
        log.warning("loaded adapter %r from %s", name, folder)

    def _runtime_run(self, folder: Path) -> Any:
        """``open_run`` on a confined folder, keeping from it only what cannot run code or point elsewhere."""
        from qlora_cli.run_folder import CONFIG_FILE, open_run
        from qlora_cli.serve_policy import _under

        in_checkpoints = folder.parent.name == "checkpoints" and not (folder / CONFIG_FILE).exists()
        if in_checkpoints and not _under(folder.parent.parent, self.policy.lora_roots):
            log.warning("runtime adapter %s: its run folder is outside the roots", folder)
            raise RequestError(REFUSED_ADAPTER, param="lora_path", code="invalid_adapter")
        try:
            run = open_run(folder, base=self.base_model)
        except Exception as e:  # noqa: BLE001 - malformed JSON/YAML/safetensors, a pickle in disguise, ...
            log.warning("runtime adapter %s: %s", folder, e)
            raise RequestError(REFUSED_ADAPTER, param="lora_path", code="invalid_adapter") from None
        trained_on = run.config.base.base_model if run.config else run.adapter_config.get("base_model_name_or_path")
        if trained_on and not same_model(str(trained_on), self.base_model):
            log.warning("runtime adapter %s: trained on %s, serving %s", folder, trained_on, self.base_model)
            raise RequestError(
                "the adapter was trained on a different base model than this server's", param="lora_path"
            )
        if run.config is not None and run.config.base.quant != self.settings.quant:
            raise RequestError(
                "the adapter was trained on a differently quantized base; this server runs "
                f"{describe_quant(self.settings.quant)}",
                param="lora_path",
            )
        own = {str(folder), str(folder.parent.parent)} if in_checkpoints else {str(folder)}  # both inside the roots
        tokenizer = run.model.tokenizer if run.model.tokenizer in own else None  # never a path a config names
        settings = replace(
            self.settings,
            tokenizer=tokenizer,
            trust_remote_code=False if tokenizer else self.policy.trust_remote_code,
            chat_template=run.model.chat_template,  # a Jinja string: transformers renders it sandboxed
        )
        return replace(run, model=settings)

    def unload_adapter(self, name: str) -> None:
        if not self.policy.allow_runtime_lora:
            raise RequestError(RUNTIME_LORA_OFF, 403, None, "runtime_lora_disabled")
        with self._lock:
            served = self.served.get(name)
            if served is None or served.slot == BASE_ONLY:
                raise RequestError(f"no adapter named {name!r} is loaded", 404, "lora_name", "model_not_found")
            del self.served[name]
            self.multi.unload(name)

    # -- requests ----------------------------------------------------------------------------------
    def resolve(self, model: str) -> Served:
        served = self.served.get(self.base_name if model == BASE_ALIAS else model)
        if served is None:
            available = ", ".join(self.served)
            raise RequestError(
                f"model {model!r} does not exist; served models: {available}", 404, "model", "model_not_found"
            )
        return served

    def check_length(self, n_prompt: int, max_tokens: int | None) -> int:
        """The max_tokens to use; RequestError when prompt + max_tokens does not fit the context."""
        if n_prompt == 0:
            raise RequestError("the prompt is empty (0 tokens)", param="prompt")
        limit = self.max_length
        if limit and n_prompt >= limit:
            raise RequestError(
                f"this model's context length is {limit} tokens; the prompt has {n_prompt} tokens, which leaves "
                "no room to generate",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = (limit - n_prompt) if limit else 256
        if limit and n_prompt + max_tokens > limit:
            raise RequestError(
                f"this model's context length is {limit} tokens; the prompt has {n_prompt} tokens and max_tokens "
                f"is {max_tokens} ({n_prompt + max_tokens} > {limit})",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def check_prompt_chars(self, n_chars: int, param: str) -> None:
        """Refuse, before tokenizing it, text far longer than the context could hold (tokenizing megabytes is
        seconds of CPU; no tokenizer packs more than ``CHARS_PER_TOKEN`` characters into a token in practice)."""
        limit = (self.max_length or MAX_CONTEXT_FALLBACK) * CHARS_PER_TOKEN
        if n_chars > limit:
            raise RequestError(
                f"the prompt has {n_chars} characters, far more than this model's context of "
                f"{self.max_length or MAX_CONTEXT_FALLBACK} tokens can hold",
                param=param,
                code="context_length_exceeded",
            )

    def sequence(
        self, served: Served, prompt_ids: list[int], params: SamplingParams, chat: bool, on_text: Any = None
    ) -> Sequence:
        eos = served.eos_ids | (served.end_of_turn_ids if chat else frozenset())
        if served.slot == BASE_ONLY:
            return Sequence(prompt_ids, served.tokenizer, params, BASE_ONLY, eos, on_text)
        try:
            slot = self.multi.pin(served.name)  # the slot stays this adapter's until the request ends
        except ModelError:
            raise RequestError(f"model {served.name!r} was just unloaded", 404, "model", "model_not_found") from None
        return Sequence(prompt_ids, served.tokenizer, params, slot, eos, on_text, on_done=self._unpin)

    def _unpin(self, seq: Sequence) -> None:
        self.multi.unpin(seq.slot)

    def submit(self, seq: Sequence) -> None:
        self.scheduler.submit(seq)

    def close(self) -> None:
        self.scheduler.stop()


RUNTIME_LORA_OFF = "loading and unloading adapters at run time is disabled on this server (--allow-runtime-lora)"
REFUSED_ADAPTER = "lora_path does not hold a LoRA adapter this server can read"


def _generic_fit_error(message: str) -> str:
    """A loading failure's detail (module names, shapes, paths) -> what a client is told."""
    if "--max-lora-rank" in message:  # names only the client's own lora_name and two numbers
        return message
    if "quantized" in message:
        return "the adapter was trained on a differently quantized base than this server's"
    if "tokenizer has more tokens" in message:
        return "the adapter's tokenizer has more tokens than the base model's embeddings"
    return "the adapter's weights do not fit this server's base model"


def describe_quant(q: QuantSettings) -> str:
    if not q.load_in_4bit:
        return f"no quantization ({q.compute_dtype})"
    return f"{q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"


# ---------------------------------------------------------------------------------------------
# prompts


CHARS_PER_TOKEN = 64
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
MAX_CONTEXT_FALLBACK = 1 << 16  # a model that states no context length


def check_text(text: str, param: str) -> str:
    """Text a tokenizer can take: a lone surrogate (valid JSON, invalid Unicode) is the client's error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{param} is not valid Unicode (it holds a lone surrogate)", param=param) from None
    return text


def encode_prompt(served: Served, prompt: Any, vocab_size: int | None = None) -> list[int]:
    """A completions ``prompt`` item (text or token ids) -> token ids, tokenized as training did. Token ids
    are checked against the vocabulary here, per request, so a bad one never reaches a shared batch."""
    if isinstance(prompt, str):
        return list(served.tokenizer(check_text(prompt, "prompt"), add_special_tokens=True)["input_ids"])
    ids = [int(t) for t in prompt]
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", param="prompt")
    return ids


def prompt_chars(prompt: Any) -> int:
    """Characters of text in a completions prompt (token ids count as none)."""
    items = [prompt] if isinstance(prompt, str) else prompt
    return sum(len(p) for p in items if isinstance(p, str))


def message_chars(messages: list[Any]) -> int:
    total = 0
    for m in messages:
        content = m.content
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return total


def render_chat(served: Served, messages: list[dict[str, Any]]) -> list[int]:
    """Chat messages -> token ids of the conversation with the assistant's generation prompt."""
    plain = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # [{"type": "text", "text": "..."}]
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        plain.append({"role": check_text(m["role"], "messages"), "content": check_text(content, "messages")})
    tok = served.tokenizer
    if not getattr(tok, "chat_template", None):
        raise RequestError(
            f"model {served.name!r} has no chat template; use /v1/completions", param="messages", code="no_template"
        )
    try:
        text = tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template may raise on roles it does not support
        raise RequestError(f"the chat template rejected these messages: {e}", param="messages") from None
    return list(tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# the OpenAI request and response shapes


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...): accepted


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.Generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    logprobs: Any = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    def sampling(self, max_tokens: int) -> SamplingParams:
        if self.logprobs not in (None, False):
            raise RequestError("logprobs is not supported", param="logprobs")
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens, temperature, top_p, [s for s in stop if s], self.seed, self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadAdapter(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(_Body):
    lora_name: str = Field(min_length=1)


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI's validation errors -> (one line naming the field, the field)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return f"malformed JSON in the request body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    if not loc:
        return "the request body must be a JSON object", None
    field = str(loc[0])
    tags = [i for i, p in enumerate(loc) if i and isinstance(p, str) and _is_type_tag(p)]
    if tags:  # one member of a union (str | list[str] ...): no one member's message fits, name the field
        loc = loc[: tags[0]]
        path = field + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        return f"invalid value for field '{path}': {_short(e.get('input'))}", field
    path = field + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if e.get("type") == "missing":
        return f"missing required field '{path}'", field
    msg = str(e.get("msg", "invalid value"))
    if field == "n":
        msg = "only n=1 is supported"
    return f"invalid field '{path}': {msg[0].lower() + msg[1:]}", field


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "none", "dict") or part.startswith("function-")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def prompt_list(prompt: Any) -> list[Any]:
    """A completions ``prompt``: text, a list of texts, token ids, or a list of token-id lists -> a list."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


def usage(seqs: list[Sequence]) -> dict[str, int]:
    prompt = sum(len(s.prompt_ids) for s in seqs)
    completion = sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def full_response(rid: str, created: int, model: str, seqs: list[Sequence], chat: bool) -> dict[str, Any]:
    if chat:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": s.text}, "logprobs": None,
             "finish_reason": s.finish_reason}
            for i, s in enumerate(seqs)
        ]  # fmt: skip
        kind = "chat.completion"
    else:
        choices = [
            {"index": i, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason} for i, s in enumerate(seqs)
        ]
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, "usage": usage(seqs)}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish: str | None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def chunk(rid: str, created: int, model: str, index: int, text: str, finish: str | None, chat: bool) -> dict:
    if chat:
        return chat_chunk(rid, created, model, index, {"content": text} if text else {}, finish)
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, created: int, model: str, seqs: list[Sequence], chat: bool) -> dict[str, Any]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [], "usage": usage(seqs)}


# ---------------------------------------------------------------------------------------------
# HTTP


def require_web_stack() -> tuple[Any, Any]:
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise QLoRAError("qlora serve needs fastapi and uvicorn: pip install 'qlora-cli[serve]'") from None
    return fastapi, uvicorn


def error_body(message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(server: ModelServer) -> Any:
    """The FastAPI app over ``server``."""
    require_web_stack()
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="qlora serve", version="1")
    if server.policy.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server.policy.api_key)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(e), e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(e.errors())
        return JSONResponse(error_body(message, param), status_code=400)

    @app.get("/health")
    async def health():
        engine = server.engine
        return {
            "status": "ok",
            "running": server.scheduler.running,
            "generated_tokens": engine.generated_tokens,
            "forwards": engine.forwards,
            "mixed_forwards": engine.mixed_forwards,
        }

    @app.get("/v1/models")
    async def models():
        data = []
        for s in list(server.served.values()):
            entry = {"id": s.name, "object": "model", "created": s.created, "owned_by": "qlora", "root": s.name}
            entry["parent"] = None if s.slot == BASE_ONLY else server.base_name
            data.append(entry)
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapter):
        await run_in_threadpool(server.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapter):
        server.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # Tokenizing, templating and waiting on the model run off the event loop, so /health and other clients
    # keep answering whatever one request sends.
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = server.resolve(body.model)
        if body.echo:
            raise RequestError("echo is not supported", param="echo")
        prompts = prompt_list(body.prompt)
        server.check_prompt_chars(prompt_chars(body.prompt), "prompt")
        ids = await run_in_threadpool(lambda: [encode_prompt(served, p, server.vocab_size) for p in prompts])
        return await _generate(body, served, ids, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        served = server.resolve(body.model)
        server.check_prompt_chars(message_chars(body.messages), "messages")
        ids = await run_in_threadpool(render_chat, served, [m.model_dump() for m in body.messages])
        return await _generate(body, served, [ids], chat=True, request=request)

    async def _generate(body: Any, served: Served, prompt_ids: list[list[int]], chat: bool, request: Any) -> Any:
        max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens else body.max_tokens
        if not chat and max_tokens is None:
            max_tokens = 16  # OpenAI's completions default
        limits = [server.check_length(len(p), max_tokens) for p in prompt_ids]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str, str | None]] = asyncio.Queue()

        def on_text(index: int) -> Any:
            def push(seq: Sequence, delta: str) -> None:  # runs in the scheduler thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, delta, seq.finish_reason))
                except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
                    seq.cancelled = True

            return push

        seqs = []
        for i, (ids, limit) in enumerate(zip(prompt_ids, limits)):
            params = body.sampling(limit)
            seqs.append(server.sequence(served, ids, params, chat, on_text(i)))
        for seq in seqs:
            server.submit(seq)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(rid, created, body.model, seqs, events, chat, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            remaining = len(seqs)
            next_check = loop.time() + DISCONNECT_POLL_S
            while remaining:
                try:
                    _, _, finish = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
                    remaining -= finish is not None
                except asyncio.TimeoutError:
                    pass
                if remaining and loop.time() >= next_check:
                    next_check = loop.time() + DISCONNECT_POLL_S
                    if await request.is_disconnected():  # nobody will read the answer: stop generating it
                        return Response(status_code=499)
        finally:
            for seq in seqs:
                seq.cancelled = seq.cancelled or not seq.finished  # the client went away: free the rows
        failed = [s for s in seqs if s.finish_reason == "error"]
        if failed:
            return JSONResponse(error_body(f"generation failed: {failed[0].error}", kind="server_error"), 500)
        return full_response(rid, created, body.model, seqs, chat)

    async def _stream(
        rid: str, created: int, model: str, seqs: list[Sequence], events: Any, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            if chat:
                yield sse(chat_chunk(rid, created, model, 0, {"role": "assistant", "content": ""}, None))
            remaining = len(seqs)
            while remaining:
                index, delta, finish = await events.get()
                seq = seqs[index]
                if finish == "error":
                    yield sse(error_body(f"generation failed: {seq.error}", kind="server_error"))
                    break
                if delta or finish:
                    yield sse(chunk(rid, created, model, index, delta, finish, chat))
                remaining -= finish is not None
            if include_usage:
                yield sse(usage_chunk(rid, created, model, seqs, chat))
            yield "data: [DONE]\n\n"
        finally:  # the client disconnected (or we are done): stop decoding rows nobody will read
            for seq in seqs:
                if not seq.finished:
                    seq.cancelled = True

    return app


# ---------------------------------------------------------------------------------------------
# running


class BackgroundServer:
    """uvicorn serving ``app`` in a thread (tests, the benchmark): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        _, uvicorn = require_web_stack()
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="qlora-http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(
    base: str | None,
    adapters: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    max_batch_size: int = 8,
    base_name: str | None = None,
    console: Any = None,
    policy: ServePolicy | None = None,
) -> None:
    """Load the base and adapters, then serve until interrupted (SIGTERM/SIGINT stop it within seconds)."""
    _, uvicorn = require_web_stack()
    policy = policy or ServePolicy()
    pairs = [parse_adapter_arg(a) for a in adapters]
    if console is not None:
        console.print(f"loading {base or 'the base model'} with {len(pairs)} adapter(s) ...", highlight=False)
    server = ModelServer(base, pairs, device=device, max_batch_size=max_batch_size, base_name=base_name, policy=policy)
    app = create_app(server)
    if console is not None:
        names = ", ".join(n for n in server.served if n != server.base_name) or "none"
        console.print(
            f"serving base '{server.base_name}' (also 'base') and adapters: {names} on http://{host}:{port}/v1",
            highlight=False,
        )
        if policy.allow_runtime_lora:
            roots = ", ".join(map(str, policy.lora_roots))
            console.print(f"runtime adapter loading is on, from: {roots}", highlight=False)
        if not policy.api_key and host not in ("127.0.0.1", "localhost", "::1"):
            console.print(
                f"[yellow]warning:[/yellow] serving on {host} without --api-key: anyone who can reach it can use it",
                highlight=False,
            )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        server.close()


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
