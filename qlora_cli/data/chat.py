"""Conversations -> token ids and labels through a chat template: the assistant turns are the targets.

A row is a conversation in the OpenAI / transformers shape: ``messages`` of ``{role, content}`` with roles system,
user, assistant and tool; an assistant message may carry ``tool_calls`` (``[{type: function, function: {name,
arguments}}]``) and ``reasoning_content``; ``tools`` (JSON-schema function definitions) come with the row or with
its dataset. ShareGPT rows (``conversations`` of ``{from, value}``) are read through a role map, LLaMA-Factory's
``function_call`` and ``observation`` turns as tool calls and tool results.

The template renders the text; each trained turn is located as the text that rendering one more message adds
(``assistant_spans``), and the tokens overlapping those spans are the targets. Which turns train: every assistant
turn (``train_on: all_assistant``), the last one only (``last_assistant``), overridden per message by ``train:
true|false``; their tool calls train with them; tool results, the system prompt and the tool schema never do.
An assistant turn's reasoning is rendered as the template renders ``reasoning_content`` (inside ``<think>`` tags
before the answer where the template has no place for it) and trains unless ``train_on_reasoning: false``.
Whatever the template would drop (the tools, a tool call, a tool result) is an error, never a silent loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qlora_cli.config import MESSAGE_ROLES
from qlora_cli.data.chat_options import DEFAULT, ChatOptions, tools_list
from qlora_cli.data.examples import IGNORE_INDEX, Example
from qlora_cli.data.sources import Row
from qlora_cli.errors import DataError

# ShareGPT's speaker names (and LLaMA-Factory's) -> roles; a dataset's ``roles`` adds to or overrides these
SHAREGPT_ROLES = {
    "human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
    "tool": "tool", "observation": "tool", "function_call": "assistant", "function": "tool",
}  # fmt: skip
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"  # reasoning where the template has no place for it
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


@dataclass
class Conversation:
    messages: list[dict[str, Any]]  # as the template reads them
    tools: list[dict[str, Any]] | None = None
    train: list[bool | None] = field(default_factory=list)  # a message's own train flag


def _text(value: Any, where: str) -> str:
    """A message's content: a string, null, or OpenAI's list of ``{type: text, text}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise DataError(f"{where}: content must be a string (or a list of text parts), got {type(value).__name__}")


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls in the OpenAI shape with ``arguments`` as an object (the templates serialise it themselves)."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: tool_calls must be a non-empty list")
    out = []
    for i, call in enumerate(calls):
        at = f"{where}: tool_calls[{i}]"
        if not isinstance(call, dict):
            raise DataError(f"{at} is not an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{at} has no function name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise DataError(f"{at}: arguments is not JSON ({args[:40]!r})") from None
        if not isinstance(args, dict):
            raise DataError(f"{at}: arguments must be a JSON object")
        entry: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if call.get("id") is not None:
            entry["id"] = str(call["id"])
        out.append(entry)
    return out


def conversation(row: Row, options: ChatOptions = DEFAULT) -> Conversation:
    """The row's conversation, checked: ``DataError`` naming the file, line and message for anything malformed."""
    fields = row.fields
    messages = fields.get("messages", fields.get("conversations"))
    if messages is None:
        raise DataError(f"{row.where}: row is missing field 'messages' (type chat needs messages)")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    names = {**SHAREGPT_ROLES, **dict(options.roles)}
    out: list[dict[str, Any]] = []
    train: list[bool | None] = []
    for i, m in enumerate(messages):
        where = f"{row.where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} is not an object")
        if "role" not in m and "from" in m:  # ShareGPT
            speaker = m["from"]
            role = names.get(speaker) if isinstance(speaker, str) else None
            if role is None:
                raise DataError(
                    f"{where}: unknown speaker {speaker!r}; known: {', '.join(sorted(names))} (map others with "
                    "the dataset's roles: {name: user})"
                )
            value = m.get("value")
            if speaker == "function_call":  # LLaMA-Factory: the value is the call as JSON
                m = {"role": "assistant", "content": "", "tool_calls": value}
            else:
                m = {**{k: v for k, v in m.items() if k not in ("from", "value")}, "role": role, "content": value}
        elif "role" in m and isinstance(m["role"], str) and m["role"] in dict(options.roles):
            m = {**m, "role": dict(options.roles)[m["role"]]}
        if "role" not in m:
            raise DataError(f"{where} is missing field 'role' (or ShareGPT's 'from')")
        role = m["role"]
        if role not in MESSAGE_ROLES:
            raise DataError(
                f"{where}: unknown role {role!r}; roles are {', '.join(MESSAGE_ROLES)} (map others with the "
                "dataset's roles: {name: user})"
            )
        calls = m.get("tool_calls") or None  # an empty list (common in exported data) is no call
        if "content" not in m and not calls:
            raise DataError(f"{where} is missing field 'content'")
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"), where)}
        if calls is not None:
            if role != "assistant":
                raise DataError(f"{where}: only assistant messages make tool calls, not {role}")
            if isinstance(calls, str):
                try:
                    calls = json.loads(calls)
                except ValueError:
                    raise DataError(f"{where}: tool_calls is a string that is not JSON") from None
            msg["tool_calls"] = _tool_calls(calls, where)
        for key in REASONING_KEYS:
            if m.get(key) is not None:
                if role != "assistant":
                    raise DataError(f"{where}: {key} belongs to assistant messages, not {role}")
                msg["reasoning_content"] = _text(m[key], where)
                if key == "thinking":  # the name gpt-oss's template reads
                    msg["thinking"] = msg["reasoning_content"]
                break
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        flag = m.get("train", m.get("training"))
        if flag is not None and not isinstance(flag, bool):
            raise DataError(f"{where}: train must be true or false")
        if flag and role != "assistant":
            raise DataError(f"{where}: train: true is for assistant messages; {role} messages are never targets")
        out.append(msg)
        train.append(flag)
    tools = fields.get("tools")
    if tools is not None and tools != [] and tools != "":
        tools = tools_list(tools, f"{row.where}: tools")
    elif options.tools is not None:
        tools = json.loads(options.tools)
    else:
        tools = None
    return Conversation(out, tools, train)


def chat_messages(row: Row) -> list[dict[str, Any]]:
    """The row's messages as the template reads them (ShareGPT's ``{from, value}`` mapped)."""
    return conversation(row).messages


def encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def render(
    tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: list[dict] | None = None,
    where: str = "",
) -> str:  # fmt: skip
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception (jinja2's TemplateError and others)
        tb, in_template = e.__traceback__, False
        while tb is not None:  # an error raised while the template ran (a TypeError on this row's values)
            in_template = in_template or tb.tb_frame.f_code.co_filename == "<template>"
            tb = tb.tb_next
        if type(e).__module__.split(".")[0] not in ("jinja2", "transformers") and not in_template:
            if not isinstance(e, ValueError):
                raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where or 'a conversation'}: the chat template cannot render this row ({reason})") from None


def _trained(conv: Conversation, options: ChatOptions, first: int) -> list[bool]:
    """Per message: is it a target (an assistant turn chosen by ``train_on`` and its own flag)."""
    last = max((i for i, m in enumerate(conv.messages) if m["role"] == "assistant"), default=-1)
    out = []
    for i, m in enumerate(conv.messages):
        chosen = m["role"] == "assistant" and i >= first and (options.train_on == "all_assistant" or i == last)
        flag = conv.train[i] if i < len(conv.train) else None
        out.append(chosen if flag is None else (flag and m["role"] == "assistant"))
    return out


def _mark(kind: str, i: int, j: int = 0) -> str:
    return f"QLORAPROBE{kind}{i}X{j}Z"  # letters and digits: survives tojson, trim and the templates' escaping


def _probe(conv: Conversation, tokenizer: Any, where: str) -> str:
    """The conversation rendered with every tool name, tool call name, tool result and reasoning replaced by a
    marker (``_mark``): which of them the template renders, whatever it does to their text."""
    tools = None
    if conv.tools:
        tools = [{**t, "function": {**t["function"], "name": _mark("T", i)}} for i, t in enumerate(conv.tools)]
    messages = []
    for i, m in enumerate(conv.messages):
        m = {k: v for k, v in m.items() if k != "_reasoning"}
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "name": _mark("C", i, j)}}
                               for j, c in enumerate(m["tool_calls"])]  # fmt: skip
        if m["role"] == "tool" and m["content"].strip():
            m["content"] = _mark("R", i)
        for key in ("reasoning_content", "thinking"):
            if m.get(key):
                m[key] = _mark("M", i)
        if "_reasoning" in conv.messages[i]:  # inlined: the marker stands in the content
            m["content"] = m["content"].replace(conv.messages[i]["_reasoning"], _mark("M", i), 1)
        messages.append(m)
    return render(tokenizer, messages, False, tools, where)


def _check_rendered(conv: Conversation, probe: str, where: str) -> None:
    """``DataError`` when the template dropped the tools, a tool call, a tool result or inlined reasoning."""
    lost = None
    for i, tool in enumerate(conv.tools or []):
        if _mark("T", i) not in probe:
            lost = f"the tool definitions (tool {tool['function']['name']!r})"
            break
    for i, m in enumerate(conv.messages):
        if lost:
            break
        for j, call in enumerate(m.get("tool_calls") or []):
            if _mark("C", i, j) not in probe:
                lost = f"tool calls (call of {call['function']['name']!r})"
                break
        if m["role"] == "tool" and m["content"].strip() and _mark("R", i) not in probe:
            lost = "tool results (role tool)"
        if "_reasoning" in m and _mark("M", i) not in probe:
            lost = "assistant reasoning, not even inside the answer (<think> tags)"
    if lost:
        raise DataError(
            f"{where}: the chat template does not render {lost}; set chat_template to one that does "
            "(llama3.1, qwen2.5, mistral-v0.3 or the model's own tool template)"
        )


def prepared(conv: Conversation, tokenizer: Any, where: str) -> Conversation:
    """The conversation as it will be rendered: reasoning inlined (``<think>`` tags before the answer) where the
    template renders none of it; as the template has it where it renders some (Qwen3 keeps the last turn's)."""
    if not any(m.get("reasoning_content") for m in conv.messages):
        return conv
    probe = _probe(conv, tokenizer, where)
    if any(_mark("M", i) in probe for i in range(len(conv.messages))):
        return conv
    messages = []
    for m in conv.messages:
        if m.get("reasoning_content"):
            r = m["reasoning_content"]
            m = {k: v for k, v in m.items() if k not in ("reasoning_content", "thinking")}
            m["content"] = THINK_OPEN + r + THINK_CLOSE + m["content"]
            m["_reasoning"] = r
        messages.append(m)
    return Conversation(messages, conv.tools, conv.train)


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, Any]], where: str, first: int = 0, conv: Conversation | None = None,
    options: ChatOptions = DEFAULT,
) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """The rendered conversation and the character spans of each trained assistant turn (content, tool calls and
    end-of-turn) from message ``first`` on.

    Each span runs from the end of the conversation-so-far rendered with a generation prompt to the end of
    the conversation rendered through that turn, trailing whitespace excluded. This needs the template to be
    prefix-stable (rendering more messages only appends text), which is checked. Without
    ``train_on_reasoning`` a turn's reasoning (and its tags) is cut from the front of its span.
    """
    conv = conv or Conversation(messages, None, [None] * len(messages))
    messages, tools = conv.messages, conv.tools
    view = [{k: v for k, v in m.items() if k != "_reasoning"} for m in messages]
    full = render(tokenizer, view, False, tools, where)
    if tools or any(m.get("tool_calls") or m["role"] == "tool" or "_reasoning" in m for m in messages):
        _check_rendered(conv, _probe(conv, tokenizer, where), where)
    trained = _trained(conv, options, first)
    spans = []
    for i, m in enumerate(messages):
        if not trained[i]:
            continue
        before = render(tokenizer, view[:i], True, tools, where) if i else ""
        through = render(tokenizer, view[: i + 1], False, tools, where)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError(
                f"{where}: the chat template is not prefix-stable (rendering turn {i} changes earlier text), "
                "so assistant turns cannot be located; set chat_template to a simpler template"
            )
        start, end = len(before), len(through.rstrip())
        reasoning = (m.get("_reasoning") or m.get("reasoning_content") or "").strip()
        if reasoning and not options.train_on_reasoning:
            at = full.find(reasoning, start, end)
            if at >= 0:  # the answer starts after the reasoning, its closing tag and the blank after it
                start = at + len(reasoning)
                rest = full[start:end]
                close = rest.lstrip()
                for tag in ("</think>", "</thinking>", "</reasoning>"):
                    if close.startswith(tag):
                        start += len(rest) - len(close) + len(tag)
                        break
                start += len(full[start:end]) - len(full[start:end].lstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def tokenize_chat(row: Row, tokenizer: Any, train_on_inputs: bool, options: ChatOptions = DEFAULT) -> Example:
    conv = prepared(conversation(row, options), tokenizer, row.where)
    return tokenize_conversation(conv.messages, tokenizer, train_on_inputs, row.where, conv=conv, options=options)


def tokenize_conversation(
    messages: list[dict[str, Any]], tokenizer: Any, train_on_inputs: bool, where: str, first_trained: int = 0,
    conv: Conversation | None = None, options: ChatOptions = DEFAULT,
) -> Example:  # fmt: skip
    """A conversation -> token ids and labels: the targets are the trained assistant turns from message
    ``first_trained`` on (preference data trains only the response after its prompt), plus EOS."""
    conv = conv or Conversation(messages, None, [None] * len(messages))
    text, spans = assistant_spans(tokenizer, conv.messages, where, first_trained, conv, options)
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
        last = len(conv.messages) - 1
        ends_trained = conv.messages[last]["role"] == "assistant" and _trained(conv, options, first_trained)[last]
        ids.append(eos)
        labels.append(eos if (ends_trained or train_on_inputs) else IGNORE_INDEX)
    return Example(ids, labels)
