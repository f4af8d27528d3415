"""Preference rows -> token ids and labels, in TRL's shapes.

    preference  {"prompt", "chosen", "rejected"}     a pair: the same prompt, a better and a worse response
    unpaired    {"prompt", "completion", "label"}    one response, desirable (label true) or not (KTO)

Each field is a string or, conversationally, a list of ``{role, content}`` messages: a string prompt is framed
by the chat template as a user turn and a string response as the assistant's reply (a tokenizer without a chat
template: prompt and response are plain text, as ``type: completion``); a conversational prompt is the
conversation so far and a response is its assistant message(s). Without a ``prompt`` field, a conversational
pair's prompt is the messages ``chosen`` and ``rejected`` start with alike (TRL's implicit prompt).

Only response tokens are targets (and EOS). A pair longer than ``sequence_len`` loses the start of its prompt
first, as TRL's truncation does, down to half of ``sequence_len``; then the end of its responses. Each example
records ``prompt_len``, the tokens before its response.
"""

from __future__ import annotations

from typing import Any

from qlora_cli.data.chat import encode, tokenize_conversation
from qlora_cli.data.examples import IGNORE_INDEX, DataStats, Example
from qlora_cli.data.sources import Row
from qlora_cli.errors import DataError

FIELDS = {"preference": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label")}


def tokenize_preference_rows(
    rows: list[Row], fmt: str, tokenizer: Any, sequence_len: int
) -> tuple[list[Example], DataStats]:
    """Pairs (``preference``: the chosen examples, each holding its ``rejected``) or labelled responses
    (``unpaired``), truncated to ``sequence_len``. Raises ``DataError`` naming the row for a bad one."""
    stats = DataStats(rows=len(rows))
    out = []
    for row in rows:
        if fmt == "preference":
            prompt, chosen, rejected = _pair_fields(row)
            seqs = [
                _tokenize(prompt, chosen, tokenizer, row.where, "chosen"),
                _tokenize(prompt, rejected, tokenizer, row.where, "rejected"),
            ]
        else:
            prompt, completion, label = _unpaired_fields(row)
            seqs = [_tokenize(prompt, completion, tokenizer, row.where, "completion")]
        cut = truncate(seqs, sequence_len)
        stats.truncated += cut
        for s in seqs:
            s.row, s.fmt = row, fmt
            stats.tokens += len(s.input_ids)
            stats.target_tokens += s.n_targets
        first = seqs[0]
        if fmt == "preference":
            first.rejected = seqs[1]
        else:
            first.label = label
        out.append(first)
    stats.examples = len(out)
    return out, stats


def unpair(examples: list[Example]) -> list[Example]:
    """Pairs as KTO's labelled responses: each chosen response desirable, each rejected one not (TRL's
    ``unpair_preference_dataset``); unpaired examples pass as they are."""
    out = []
    for e in examples:
        if e.rejected is None:
            out.append(e)
            continue
        rejected = e.rejected
        e.rejected, e.label, rejected.label = None, True, False
        out += [e, rejected]
    return out


# ---------------------------------------------------------------------------------------------
# rows


def _missing(row: Row, name: str, fmt: str) -> DataError:
    return DataError(f"{row.where}: row is missing field '{name}' (type {fmt} needs {', '.join(FIELDS[fmt])})")


def _messages(row: Row, name: str) -> list[dict[str, str]]:
    value = row.fields[name]
    if not isinstance(value, list) or not value:
        raise DataError(f"{row.where}: field '{name}' must be a string or a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{row.where}: {name}[{i}] must have string fields 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text_or_messages(row: Row, name: str) -> str | list[dict[str, str]]:
    value = row.fields[name]
    return value if isinstance(value, str) else _messages(row, name)


def _response(row: Row, name: str) -> str | list[dict[str, str]]:
    value = _text_or_messages(row, name)
    if isinstance(value, str):
        empty = not value.strip()
    else:
        if not any(m["role"] == "assistant" for m in value):
            raise DataError(f"{row.where}: field '{name}' has no assistant message (the response to train on)")
        empty = not any(m["content"].strip() for m in value if m["role"] == "assistant")
    if empty:
        raise DataError(f"{row.where}: field '{name}' is an empty response")
    return value


def _pair_fields(row: Row) -> tuple[Any, Any, Any]:
    for name in ("chosen", "rejected"):
        if row.fields.get(name) is None:
            raise _missing(row, name, "preference")
    if row.fields.get("prompt") is None:
        prompt, chosen, rejected = _implicit_prompt(row)
    elif isinstance(row.fields["prompt"], str) and _shared_opening(row):
        # a string prompt beside whole conversations that open alike repeats their first turns: TRL takes the
        # conversations' shared opening as the prompt then, and so does qlora
        prompt, chosen, rejected = _implicit_prompt(row)
    else:
        prompt, chosen, rejected = (
            _text_or_messages(row, "prompt"),
            _response(row, "chosen"),
            _response(row, "rejected"),
        )
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{row.where}: 'chosen' and 'rejected' must both be strings or both lists of messages")
    if chosen == rejected:
        raise DataError(f"{row.where}: 'chosen' and 'rejected' are the same response (nothing to prefer)")
    return prompt, chosen, rejected


def _shared_opening(row: Row) -> bool:
    chosen, rejected = row.fields["chosen"], row.fields["rejected"]
    return (
        isinstance(chosen, list)
        and isinstance(rejected, list)
        and bool(chosen)
        and bool(rejected)
        and (chosen[0] == rejected[0] and isinstance(chosen[0], dict) and chosen[0].get("role") != "assistant")
    )


def _implicit_prompt(row: Row) -> tuple[Any, Any, Any]:
    """TRL's implicit prompt: the leading messages ``chosen`` and ``rejected`` share, up to the last shared
    message before an assistant turn that differs."""
    if not isinstance(row.fields["chosen"], list) or not isinstance(row.fields["rejected"], list):
        raise _missing(row, "prompt", "preference")
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant" and (n == len(chosen) or chosen[n]["role"] != "assistant"):
        n -= 1  # the shared part ends before the responses' first assistant turn
    if n == 0:
        raise _missing(row, "prompt", "preference")
    row.fields = {**row.fields, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    return chosen[:n], _response(row, "chosen"), _response(row, "rejected")


def _unpaired_fields(row: Row) -> tuple[Any, Any, bool]:
    for name in FIELDS["unpaired"]:
        if row.fields.get(name) is None:
            raise _missing(row, name, "unpaired")
    label = row.fields["label"]
    if not isinstance(label, bool):
        raise DataError(f"{row.where}: field 'label' must be true (desirable) or false, got {label!r}")
    return _text_or_messages(row, "prompt"), _response(row, "completion"), label


# ---------------------------------------------------------------------------------------------
# tokens


def _tokenize(prompt: Any, response: Any, tokenizer: Any, where: str, name: str) -> Example:
    """One prompt + response as an example whose targets are the response's tokens (and EOS)."""
    chat = getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str) and isinstance(response, str) and not chat:
        prompt_ids = encode(tokenizer, prompt, special=True)
        response_ids = encode(tokenizer, response, special=False) + [tokenizer.eos_token_id]
        ex = Example(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)
    else:
        if not chat:
            raise DataError(
                f"{where}: conversational preference rows need a chat template; the tokenizer has none (set "
                "chat_template to a name such as chatml or llama3)"
            )
        before = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        after = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
        try:
            ex = tokenize_conversation(before + after, tokenizer, False, f"{where} ({name})", first_trained=len(before))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - the template's own refusal (e.g. roles that must alternate)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{where}: the chat template cannot render this row ({reason})") from None
    first = next((i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX), len(ex.labels))
    ex.prompt_len = first
    return ex


def truncate(seqs: list[Example], sequence_len: int) -> int:
    """Fit the sequences of one row (a pair, or one response) into ``sequence_len``: the prompt loses its
    start first, down to half of ``sequence_len``, then each response its end. Returns 1 if anything was cut."""
    longest_response = max(len(s.input_ids) - s.prompt_len for s in seqs)
    cut = 0
    for s in seqs:
        if len(s.input_ids) <= sequence_len and s.prompt_len + longest_response <= sequence_len:
            continue
        keep = min(s.prompt_len, max(sequence_len - longest_response, sequence_len // 2))
        drop = s.prompt_len - keep
        ids, labels = s.input_ids[drop:][:sequence_len], s.labels[drop:][:sequence_len]
        if drop or len(ids) < len(s.input_ids) - drop:
            cut = 1
        s.input_ids, s.labels, s.prompt_len = ids, labels, keep
    return cut
