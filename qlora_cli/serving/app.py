"""The HTTP side of ``qlora serve``: OpenAI request and response shapes, the FastAPI app over a ``ModelServer``,
and running it (uvicorn in the foreground for the CLI, in a thread for tests and the benchmark).

fastapi and uvicorn are imported only here, with a one-line error when missing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qlora_cli.errors import QLoRAError
from qlora_cli.serving.engine import Generation, SamplingParams
from qlora_cli.serving.multi_lora import BASE_ONLY
from qlora_cli.serving.policy import ApiKeyMiddleware, ServePolicy
from qlora_cli.serving.server import (
    ModelServer,
    RequestError,
    Served,
    encode_prompt,
    message_chars,
    parse_adapter_arg,
    prompt_chars,
    render_chat,
)

try:  # at module level, so FastAPI can resolve the handlers' `request: Request` annotation
    from starlette.requests import Request
except ImportError:  # no web stack: create_app says so (require_web_stack)
    Request = Any  # type: ignore[misc,assignment]

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


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


def usage(seqs: list[Generation]) -> dict[str, int]:
    prompt = sum(len(s.prompt_ids) for s in seqs)
    completion = sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def full_response(rid: str, created: int, model: str, seqs: list[Generation], chat: bool) -> dict[str, Any]:
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


def usage_chunk(rid: str, created: int, model: str, seqs: list[Generation], chat: bool) -> dict[str, Any]:
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
            def push(seq: Generation, delta: str) -> None:  # runs in the scheduler thread
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
        rid: str, created: int, model: str, seqs: list[Generation], events: Any, chat: bool, include_usage: bool
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


def run_serve(
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
