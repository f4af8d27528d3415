"""``qlora serve``: an OpenAI-compatible HTTP server for many adapters on one (4-bit) base.

    GET  /health                      {"status": "ok"}
    GET  /v1/models                   the base and every loaded adapter
    POST /v1/completions              OpenAI completions (``stream: true`` -> server-sent events)
    POST /v1/chat/completions         OpenAI chat completions, through the adapter's chat template
    POST /v1/load_lora_adapter        {"lora_name", "lora_path"}   (vLLM's shape)
    POST /v1/unload_lora_adapter      {"lora_name"}

``model`` names an adapter, or the base: by its folder name (``llama-3.1-8b`` for ``./models/llama-3.1-8b``) or
``base``. The base is loaded once, quantized as the adapters were trained (read from their run folders), and
one engine thread (``EngineLoop``) decodes every running request together: rows for different adapters share each forward
(``MultiLoRA``), new requests join between steps, and a client that goes away only loses its own row.

``ModelServer`` (this module) is the model side, with no HTTP: tests and the benchmark drive it directly.
``serving.app`` wraps it in FastAPI and runs it.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qlora_cli.config import ModelSettings, QuantSettings
from qlora_cli.errors import ModelError, QLoRAError
from qlora_cli.serving.engine import Engine, EngineLoop, Generation, SamplingParams, end_of_turn_ids, eos_ids
from qlora_cli.serving.multi_lora import BASE_ONLY, MultiLoRA
from qlora_cli.serving.policy import (
    MAX_CONFIG_BYTES,
    PolicyError,
    ServePolicy,
    check_file_sizes,
    confine_lora_path,
    confined_file,
    log,
    private_tokenizer,
)

BASE_ALIAS = "base"
DEFAULT_QUANT = QuantSettings()  # a base served with no adapter: qlora's default


class RequestError(QLoRAError):
    """A request the server refuses: HTTP ``status`` with an OpenAI-shaped error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# ---------------------------------------------------------------------------------------------
# the model side


class AdapterRefused(ModelError):
    """An adapter this server cannot take, with ``public``: the reason as a client may read it."""

    def __init__(self, message: str, public: str):
        super().__init__(message)
        self.public = public


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
        from qlora_cli.model.loading import DTYPES, load_base_model, load_tokenizer, resolve_device
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
        self.scheduler = EngineLoop(self.engine).start()

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
            raise AdapterRefused(
                f"adapter {name!r} was trained on a base quantized as {describe_quant(run.model.quant)}; this "
                f"server runs {describe_quant(self.settings.quant)}",
                public="the adapter was trained on a differently quantized base than this server's",
            )
        if len(tokenizer) > self.model.get_input_embeddings().num_embeddings:
            raise AdapterRefused(
                f"adapter {name!r}: its tokenizer has more tokens than the base model's embeddings",
                public="the adapter's tokenizer has more tokens than the base model's embeddings",
            )
        rank = run.adapter_config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ModelError(f"adapter {name!r}: adapter_config.json has no valid rank 'r'")
        if rank > self.policy.max_lora_rank:
            message = f"adapter {name!r} has rank {rank}; this server's --max-lora-rank is {self.policy.max_lora_rank}"
            raise AdapterRefused(message, public=message)  # the client's own name and two numbers
        adapter = self.multi.load(name, run.path)
        self.served[name] = self._served(name, adapter.slot, tokenizer, str(run.path))

    # -- run-time adapter management ---------------------------------------------------------------
    def load_adapter(self, name: str, lora_path: str) -> None:
        """Load a client-named adapter folder under ``name`` while serving (``--allow-runtime-lora``).

        The folder must resolve under an operator's ``--lora-root``. Only its adapter files, the quantization
        its run recorded and its own tokenizer files (read with no remote code) are used: the base model, the
        tokenizer path and every loading policy stay the server's. Raises ``RequestError`` with a message that
        names no server path and echoes nothing from the folder's files; details go to the server's log."""
        from qlora_cli.model.loading import load_tokenizer

        if not self.policy.allow_runtime_lora:
            raise RequestError(RUNTIME_LORA_OFF, 403, None, "runtime_lora_disabled")
        roots = self.policy.lora_roots
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
                with tempfile.TemporaryDirectory(prefix="qlora-tokenizer-") as private:
                    own = run.model.tokenizer and private_tokenizer(Path(run.model.tokenizer), roots, Path(private))
                    tokenizer = load_tokenizer(replace(run.model, tokenizer=private if own else None))
            except PolicyError as e:
                raise RequestError(str(e), e.status, "lora_path", "invalid_adapter") from None
            except Exception as e:  # noqa: BLE001 - any failure reading a client's tokenizer files is a refusal
                log.warning("runtime adapter %s: tokenizer: %s", folder, e)
                raise RequestError("the adapter folder's tokenizer cannot be loaded", param="lora_path") from None
            try:
                self._add(name, run, tokenizer)
            except ModelError as e:
                log.warning("runtime adapter %s: %s", folder, e)
                raise RequestError(public_fit_error(e), param="lora_path", code="invalid_adapter") from None
        log.warning("loaded adapter %r from %s", name, folder)

    def _runtime_run(self, folder: Path) -> Any:
        """``open_run`` on a confined folder, keeping from it only what cannot run code or point elsewhere."""
        from qlora_cli.layout import CHECKPOINTS_DIR, CONFIG_FILE
        from qlora_cli.run_folder import open_run
        from qlora_cli.serving.policy import _under

        in_checkpoints = folder.parent.name == CHECKPOINTS_DIR  # by path alone: no client file is read here
        if in_checkpoints and not _under(folder.parent.parent, self.policy.lora_roots):
            log.warning("runtime adapter %s: its run folder is outside the roots", folder)
            raise RequestError(REFUSED_ADAPTER, param="lora_path", code="invalid_adapter")
        roots = self.policy.lora_roots

        def confined(file: Path) -> bool:  # every file open_run looks at resolves under a root, or PolicyError
            return confined_file(file, roots, MAX_CONFIG_BYTES if file.name == CONFIG_FILE else None) is not None

        try:
            run = open_run(folder, base=self.base_model, check=confined)
        except PolicyError:
            raise RequestError(REFUSED_ADAPTER, param="lora_path", code="invalid_adapter") from None
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
            chat_template=run.model.chat_template,  # a family name or Jinja text: transformers renders it sandboxed
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
    ) -> Generation:
        eos = served.eos_ids | (served.end_of_turn_ids if chat else frozenset())
        if served.slot == BASE_ONLY:
            return Generation(prompt_ids, served.tokenizer, params, BASE_ONLY, eos, on_text)
        try:
            slot = self.multi.pin(served.name)  # the slot stays this adapter's until the request ends
        except ModelError:
            raise RequestError(f"model {served.name!r} was just unloaded", 404, "model", "model_not_found") from None
        return Generation(prompt_ids, served.tokenizer, params, slot, eos, on_text, on_done=self._unpin)

    def _unpin(self, seq: Generation) -> None:
        self.multi.unpin(seq.slot)

    def submit(self, seq: Generation) -> None:
        self.scheduler.submit(seq)

    def close(self) -> None:
        self.scheduler.stop()


RUNTIME_LORA_OFF = "loading and unloading adapters at run time is disabled on this server (--allow-runtime-lora)"
REFUSED_ADAPTER = "lora_path does not hold a LoRA adapter this server can read"


def public_fit_error(e: ModelError) -> str:
    """A loading failure -> what a client is told: ``AdapterRefused.public``, else a generic line (the detail names
    modules, shapes and paths; it goes to the server's log)."""
    if isinstance(e, AdapterRefused):
        return e.public
    return "the adapter's weights do not fit this server's base model"


def describe_quant(q: QuantSettings) -> str:
    if not q.load_in_4bit:
        return f"no quantization ({q.compute_dtype})"
    return f"{q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"


# ---------------------------------------------------------------------------------------------
# prompts


CHARS_PER_TOKEN = 64
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
