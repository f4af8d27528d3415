"""Conversations -> token ids and labels through a chat template: the assistant turns are the targets.

The template renders the text; each assistant turn is located as the text that rendering one more message adds
(``assistant_spans``), and the tokens overlapping those spans are the targets.
"""

from __future__ import annotations

from typing import Any

from qlora_cli.data.examples import IGNORE_INDEX, Example
from qlora_cli.data.sources import Row
from qlora_cli.errors import DataError

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def chat_messages(row: Row) -> list[dict[str, str]]:
    """The row's messages as [{role, content}], accepting ShareGPT's {from, value} too."""
    messages = row.fields.get("messages", row.fields.get("conversations"))
    if messages is None:
        raise DataError(f"{row.where}: row is missing field 'messages' (type chat needs messages)")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and "from" in m and "value" in m and "role" not in m:
            m = {"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{row.where}: messages[{i}] is missing field 'role' or 'content'")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise DataError(f"{row.where}: messages[{i}] role and content must be strings")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], where: str, first: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (content + end-of-turn) from
    message ``first`` on.

    Each span runs from the end of the conversation-so-far rendered with a generation prompt to the end of
    the conversation rendered through that turn, trailing whitespace excluded. This needs the template to be
    prefix-stable (rendering more messages only appends text), which is checked.
    """
    full = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError(
                f"{where}: the chat template is not prefix-stable (rendering turn {i} changes earlier text), "
                "so assistant turns cannot be located; set chat_template to a simpler template"
            )
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def tokenize_chat(row: Row, tokenizer: Any, train_on_inputs: bool) -> Example:
    return tokenize_conversation(chat_messages(row), tokenizer, train_on_inputs, row.where)


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: Any, train_on_inputs: bool, where: str, first_trained: int = 0
) -> Example:
    """A conversation -> token ids and labels: the targets are the assistant turns from message ``first_trained``
    on (preference data trains only the response after its prompt), plus EOS."""
    text, spans = assistant_spans(tokenizer, messages, where, first_trained)
    eos = tokenizer.eos_token_id
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # A token is a target when its characters overlap an assistant span.
        is_target = [
            any(s < span_end and e > span_start for span_start, span_end in spans) for s, e in enc["offset_mapping"]
        ]
    else:  # slow tokenizers have no offsets: count tokens of each rendered prefix instead
        ids = encode(tokenizer, text, special=False)
        is_target = [False] * len(ids)
        for start, end in spans:
            a = len(encode(tokenizer, text[:start], special=False))
            b = len(encode(tokenizer, text[:end], special=False))
            for j in range(a, min(b, len(ids))):
                is_target[j] = True
    labels = [t if (train_on_inputs or flag) else IGNORE_INDEX for t, flag in zip(ids, is_target)]
    # EOS must be learned: append it unless the last assistant turn already ends with it.
    last_target = max((j for j, flag in enumerate(is_target) if flag), default=-1)
    if last_target < 0 or ids[last_target] != eos:
        ends_with_assistant = messages[-1]["role"] == "assistant"
        ids.append(eos)
        labels.append(eos if (ends_with_assistant or train_on_inputs) else IGNORE_INDEX)
    return Example(ids, labels)
