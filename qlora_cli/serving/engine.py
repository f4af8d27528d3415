"""Text generation for ``qlora generate`` and ``qlora serve``: greedy or sampled, KV cache, stop strings,
streamed text, and rows of one batch using different adapters.

    Generation  one request: prompt ids, sampling settings, adapter slot; turns each new token into text
    Engine      batched decoding with a KV cache: prefill new rows, decode one token for every running row,
                drop finished rows, and let new rows join a running batch between steps (continuous batching)
    EngineLoop  a background thread that feeds waiting requests to the engine (what the server uses)

Rows are left-padded, so every row's newest token is in the last column; ``attention_mask`` hides the padding
and ``position_ids`` count only real tokens, as ``model.generate`` does. A row that joins a running batch is
prefilled alone and its cache is left-padded to the batch's length (plain ``DynamicLayer`` caches only; other
cache kinds wait for the running batch to finish).
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qlora_cli.model.loading import autocast, context_length, end_of_turn_id, eos_token_ids, module_device
from qlora_cli.serving.multi_lora import BASE_ONLY, MultiLoRA

REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete multi-byte character


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these (not included)
    seed: int | None = None  # a seeded request samples the same text every time
    ignore_eos: bool = False  # keep going past EOS until max_tokens (benchmarks)


# ---------------------------------------------------------------------------------------------
# token ids -> text, a token at a time


class IncrementalDecoder:
    """Decode a growing list of token ids into text deltas without splitting a character.

    Decodes a short window (a few tokens of context plus the new ones) and returns the text beyond what the
    context decodes to: tokenizers that drop a word's leading space at the start of a decode (SentencePiece)
    still get it right, and a byte-level token that ends inside a multi-byte character yields nothing until
    the character is complete. The same scheme as vLLM's and Hugging Face's ``TextStreamer``.
    """

    def __init__(self, tokenizer: Any, context_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids)[-6:]  # the prompt's tail: context for the first tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (and must wait)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------------------------------------
# one request


@dataclass(eq=False)
class Generation:
    """One request being generated. ``on_text(seq, delta)`` is called (from the engine's thread) with each
    new piece of text, and once more with ``seq.finish_reason`` set when the request is done."""

    prompt_ids: list[int]
    tokenizer: Any
    params: SamplingParams = field(default_factory=SamplingParams)
    slot: int = BASE_ONLY  # adapter slot (see MultiLoRA.slot); -1: the base alone
    eos_ids: frozenset[int] = frozenset()
    on_text: Callable[[Generation, str], None] | None = None
    on_done: Callable[[Generation], None] | None = None  # called once, when the request ends for any reason
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the text released so far
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    error: str | None = None
    cancelled: bool = False  # set from another thread: the engine drops the row at its next step

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.tokenizer, self.prompt_ids)
        self._pending = ""  # decoded text not yet released (it may be the start of a stop string)
        self.generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> None:
        """Take the next token: extend the text, check EOS, stop strings and max_tokens, and report."""
        self.output_ids.append(token_id)
        if token_id in self.eos_ids and not self.params.ignore_eos:
            return self._finish("stop")
        self._pending += self.decoder.add(token_id)
        stops = self.params.stop
        hits = [i for i in (self._pending.find(s) for s in stops if s) if i >= 0]
        if hits:
            self._pending = self._pending[: min(hits)]
            return self._finish("stop", flush=False)
        if len(self.output_ids) >= self.params.max_tokens:
            return self._finish("length")
        keep = held_back(self._pending, stops)
        self._release(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]

    def _release(self, delta: str) -> None:
        if delta:
            self.text += delta
            if self.on_text is not None:
                self.on_text(self, delta)

    def _finish(self, reason: str, flush: bool = True) -> None:
        if flush:
            self._pending += self.decoder.flush()
        delta, self._pending = self._pending, ""
        if delta:
            self.text += delta
        self.finish_reason = reason
        if self.on_done is not None:
            self.on_done(self)
        if self.on_text is not None:
            self.on_text(self, delta)

    def cancel(self, reason: str = "cancelled", error: str | None = None) -> None:
        """End the request without more text (from the engine's thread)."""
        if not self.finished:
            self.error = error
            self._finish(reason, flush=False)


# ---------------------------------------------------------------------------------------------
# sampling


def sample_next(logits: torch.Tensor, seqs: list[Generation]) -> list[int]:
    """One token per row of ``logits`` (B, V): argmax for greedy rows, else temperature + top-p sampling."""
    tokens = logits.argmax(dim=-1).tolist()
    for b, seq in enumerate(seqs):
        p = seq.params
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logits[b].float() / p.temperature, dim=-1)  # (V,)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(0) - sorted_p  # probability mass ranked above each token
            drop = before >= p.top_p
            drop[0] = False  # the top token always stays
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        if seq.generator is None and p.seed is not None:
            seq.generator = torch.Generator(device=probs.device).manual_seed(p.seed)
        tokens[b] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    return tokens


# ---------------------------------------------------------------------------------------------
# batched decoding


@dataclass
class Batch:
    """The running rows: their KV cache, attention mask (B, L) and the token each feeds next."""

    seqs: list[Generation]
    cache: Any
    attention_mask: torch.Tensor  # (B, L) 1 = real token, 0 = left padding
    next_ids: torch.Tensor  # (B,) the last sampled token of each row, input of the next step


def _forward_parameters(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return set()


def _cache_of(outputs: Any) -> Any:
    for key in ("cache", "past_key_values"):
        cache = outputs.get(key) if hasattr(outputs, "get") else getattr(outputs, key, None)
        if cache is not None:
            return cache
    raise RuntimeError("the model returned no KV cache")


def _plain_layers(cache: Any) -> list[Any] | None:
    """The cache's layers when they are all plain ``DynamicLayer`` (which we may pad and join), else None."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - transformers before 4.56
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return list(layers)


class Engine:
    """Batched generation on one model whose rows may use different adapters (``MultiLoRA``) or none."""

    def __init__(
        self,
        model: Any,
        adapters: MultiLoRA | None = None,
        max_batch_size: int = 8,
        compute_dtype: torch.dtype = torch.float32,
    ):
        """``compute_dtype``: run under autocast to it (as training did) unless it is float32."""
        self.model = model
        self.compute_dtype = compute_dtype
        self.adapters = adapters
        self.max_batch_size = max_batch_size
        self.device = module_device(model)
        self.max_length = context_length(model)
        params = _forward_parameters(model)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self.keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        self.lock = adapters.lock if adapters is not None else threading.RLock()
        self.generated_tokens = 0  # statistics, read by /health and the benchmark
        self.forwards = 0
        self.mixed_forwards = 0  # forwards whose rows used more than one adapter (or adapters and the base)

    # -- one forward ---------------------------------------------------------------------------
    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seqs: list[Generation], cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """Logits of each row's last position (B, V) float32, and the updated cache."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]  # real tokens only
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": True,
        }
        if cache is not None:
            kwargs[self.cache_arg] = cache
        if self.keep_arg:
            kwargs[self.keep_arg] = 1
        slots = [s.slot for s in seqs]
        self.forwards += 1
        self.mixed_forwards += len(set(slots)) > 1
        with self.lock, torch.inference_mode(), self._autocast():
            if self.adapters is not None:
                with self.adapters.use_rows(slots):
                    out = self.model(**kwargs)
            else:
                out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), _cache_of(out)

    def _autocast(self) -> Any:
        return autocast(self.compute_dtype, self.device)

    def prefill(self, seqs: list[Generation]) -> Batch:
        """Run the prompts (left-padded) through the model and take each row's first token."""
        T = max(len(s.prompt_ids) for s in seqs)
        input_ids = torch.zeros((len(seqs), T), dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, T - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, T - len(s.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        logits, cache = self._forward(input_ids, mask, seqs, None)
        batch = Batch(seqs, cache, mask, torch.zeros(len(seqs), dtype=torch.long, device=self.device))
        self._take(batch, logits)
        return batch

    def step(self, batch: Batch) -> None:
        """Decode one more token for every row."""
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(batch.seqs), 1)], 1)
        logits, batch.cache = self._forward(batch.next_ids[:, None], batch.attention_mask, batch.seqs, batch.cache)
        self._take(batch, logits)

    def _take(self, batch: Batch, logits: torch.Tensor) -> None:
        tokens = sample_next(logits, batch.seqs)
        for seq, token in zip(batch.seqs, tokens):
            if not seq.finished and not seq.cancelled:
                seq.append(token)
                self.generated_tokens += 1
                if (
                    not seq.finished
                    and self.max_length
                    and len(seq.prompt_ids) + len(seq.output_ids) >= self.max_length
                ):
                    seq._finish("length")
        batch.next_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)

    # -- batch bookkeeping -------------------------------------------------------------------------
    def drop_finished(self, batch: Batch) -> Batch | None:
        """Remove finished and cancelled rows (and padding no remaining row needs). None when no row is left."""
        for seq in batch.seqs:
            if seq.cancelled and not seq.finished:
                seq.cancel()
        keep = [i for i, s in enumerate(batch.seqs) if not s.finished]
        if not keep:
            return None
        if len(keep) < len(batch.seqs):
            index = torch.tensor(keep, device=self.device)
            batch.cache.batch_select_indices(index)
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.attention_mask, batch.next_ids = batch.attention_mask[index], batch.next_ids[index]
            layers = _plain_layers(batch.cache)
            lead = int(batch.attention_mask.any(0).int().argmax())  # columns that are padding in every row
            if layers is not None and lead > 0:
                batch.attention_mask = batch.attention_mask[:, lead:]
                for layer in layers:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        return batch

    def can_join(self, batch: Batch) -> bool:
        return _plain_layers(batch.cache) is not None

    def join(self, batch: Batch, new: Batch) -> Batch:
        """One batch of both: the shorter cache and mask are left-padded to the longer's length."""
        a_layers, b_layers = _plain_layers(batch.cache), _plain_layers(new.cache)
        assert a_layers is not None and b_layers is not None and len(a_layers) == len(b_layers)
        La, Lb = batch.attention_mask.shape[1], new.attention_mask.shape[1]
        L = max(La, Lb)
        for la, lb in zip(a_layers, b_layers):
            la.keys = torch.cat([F.pad(la.keys, (0, 0, L - La, 0)), F.pad(lb.keys, (0, 0, L - Lb, 0))])
            la.values = torch.cat([F.pad(la.values, (0, 0, L - La, 0)), F.pad(lb.values, (0, 0, L - Lb, 0))])
        mask = torch.cat([F.pad(batch.attention_mask, (L - La, 0)), F.pad(new.attention_mask, (L - Lb, 0))])
        return Batch(batch.seqs + new.seqs, batch.cache, mask, torch.cat([batch.next_ids, new.next_ids]))

    def advance(self, batch: Batch | None, waiting: list[Generation]) -> Batch | None:
        """One scheduling step: admit waiting rows (taken from ``waiting``) if there is room, then decode one
        token for the rows that were already running. Returns the running batch (None when idle)."""
        room = self.max_batch_size - (len(batch.seqs) if batch else 0)
        if waiting and room > 0 and (batch is None or self.can_join(batch)):
            new_seqs = [s for s in waiting[:room] if not s.cancelled]
            for s in waiting[:room]:
                if s.cancelled:
                    s.cancel()
            del waiting[:room]
            if new_seqs:
                new = self.safe(lambda: self.prefill(new_seqs), new_seqs)
                new = self.drop_finished(new) if new else None
                if new is not None:
                    return new if batch is None else self.join(batch, new)  # same model: same cache kind
        if batch is None:
            return None
        ok = self.safe(lambda: self.step(batch), batch.seqs)
        return self.drop_finished(batch) if ok is not None else None

    def safe(self, fn: Callable[[], Any], seqs: list[Generation]) -> Any:
        """Run ``fn``; on an error (out of memory, a bug) end these rows with the error instead of the server."""
        try:
            result = fn()
            return True if result is None else result
        except Exception as e:  # noqa: BLE001 - reported to each request, the engine keeps serving
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            for s in seqs:
                s.cancel("error", message)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def run(self, seqs: list[Generation]) -> list[Generation]:
        """Generate every sequence to the end (at most ``max_batch_size`` rows at a time); returns them."""
        waiting, batch = list(seqs), None
        while waiting or batch is not None:
            batch = self.advance(batch, waiting)
        return list(seqs)


# ---------------------------------------------------------------------------------------------
# the background loop the server uses


class EngineLoop:
    """A thread that gathers submitted requests into batches and decodes them, a token per step for every
    running row; new requests join between steps. ``submit`` returns at once; text arrives via ``on_text``."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05):
        self.engine = engine
        self.idle_wait = idle_wait
        self.inbox: queue.Queue[Generation] = queue.Queue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="qlora-scheduler", daemon=True)
        self.running = 0

    def start(self) -> EngineLoop:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def submit(self, seq: Generation) -> None:
        self.inbox.put(seq)

    def _loop(self) -> None:
        waiting: list[Generation] = []
        batch: Batch | None = None
        while not self.stopped.is_set():
            if batch is None and not waiting:
                try:
                    waiting.append(self.inbox.get(timeout=self.idle_wait))
                except queue.Empty:
                    continue
            while True:  # everything that arrived since the last step
                try:
                    waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            batch = self.engine.advance(batch, waiting)
            self.running = len(batch.seqs) if batch else 0
        for seq in waiting + (batch.seqs if batch else []):
            seq.cancel("cancelled", "the server is shutting down")


# ---------------------------------------------------------------------------------------------
# when to stop


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """``model.loading.end_of_turn_id`` as a set (empty when there is none), for a sequence's stop set."""
    turn = end_of_turn_id(tokenizer)
    return frozenset() if turn is None else frozenset([turn])


def eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    return frozenset(eos_token_ids(tokenizer, model))
