"""Chat templates by name: ``chat_template: llama3`` means Llama-3's template, written here.

``chat_template`` in a config is one of:

    tokenizer (or null)   the tokenizer's own template (the default)
    a family name         one of ``NAMES`` below; Axolotl's spellings (``qwen_25``, ``phi_3``, ...) are aliases
    a Jinja template      any text containing ``{{`` or ``{%``

Anything else is refused when the config is validated (a name that is not a template must never be used as
one: it would render every conversation as that one word).

Each named template renders the same text as the family's own tokenizer template for a conversation with
a system prompt (tests/fixtures/family_chat_templates.json holds those templates as the models'
tokenizer_config.json files write them), and is prefix-stable: rendering one more message only appends
text, which is how ``data.pipeline.assistant_spans`` finds the assistant turns. Where a family's own template
differs, on purpose:

- gemma, mistral: their own templates refuse a system message; here it opens the first user turn,
  followed by a blank line (as Gemma 3's template does).
- phi3: Phi-3's own template ends a conversation rendered without a generation prompt with EOS (so
  rendering more turns changes earlier text); here that EOS is left out and qlora appends it as a target
  token, so the token ids are the same.
- alpaca: no model ships it; it is qlora's ``alpaca`` row format (the Stanford Alpaca prompt) as a chat
  template: a system message replaces the opening sentence, each user turn is an instruction.
"""

from __future__ import annotations

import json
import re
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The system prompt goes into the first turn: Llama-2 wraps it in <<SYS>>; Gemma and Mistral (whose own
# templates refuse it) put it before the user's text with a blank line.
_SYSTEM_INTO_FIRST_TURN = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = {prefix} %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
)

LLAMA2_TEMPLATE = _SYSTEM_INTO_FIRST_TURN.replace(
    "{prefix}", "'<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n'"
) + (
    "{% for message in turns %}"
    "{% set content = (system if loop.first else '') + message['content'] %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

MISTRAL_TEMPLATE = (
    _SYSTEM_INTO_FIRST_TURN.replace("{prefix}", "messages[0]['content'] + '\\n\\n'") + "{{ bos_token }}"
    "{% for message in turns %}"
    "{% set content = (system if loop.first else '') + message['content'] %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + content + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + eos_token }}{% endif %}"
    "{% endfor %}"
)

GEMMA_TEMPLATE = (
    _SYSTEM_INTO_FIRST_TURN.replace("{prefix}", "messages[0]['content'] + '\\n\\n'") + "{{ bos_token }}"
    "{% for message in turns %}"
    "{% set content = (system if loop.first else '') + message['content'] %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + content | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Qwen2.5's own template, as Qwen2.5-*-Instruct ship it: tools in the system turn, tool calls in <tool_call> tags,
# tool results in a user turn's <tool_response> tags.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Llama 3.1's own template (Llama-3.1-*-Instruct, Llama-3.3-70B-Instruct): a date header in the system turn, tools
# in the first user turn, one tool call per assistant turn as JSON, tool results in ipython turns.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    "\n"
    "{#- System message + builtin tools #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if builtin_tools is defined or tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n'
    "{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- endif %}\n"
    "                {%- endfor %}\n"
    '            {{- ")" }}\n'
    "        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    '            {{- "}" }}\n'
    "        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n"
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    "        {%- else %}\n"
    '            {{- "<|eot_id|>" }}\n'
    "        {%- endif %}\n"
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Mistral-7B-Instruct-v0.3's own template: [AVAILABLE_TOOLS] and the system prompt before the last user turn,
# [TOOL_CALLS] and [TOOL_RESULTS] with 9-character call ids. The system prompt and tools move to the last user
# turn, so a conversation with more than one user turn and a system prompt or tools is not prefix-stable (refused).
MISTRAL_V03_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    "\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n"
    "{%- set ns.index = 0 %}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}\n'
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "        {%- endif %}\n"
    "        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if message["role"] == "user" %}\n'
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    '            {{- "[AVAILABLE_TOOLS] [" }}\n'
    "            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n"
    "                    {%- if not loop.last %}\n"
    '                        {{- ", " }}\n'
    "                    {%- endif %}\n"
    "                {%- endfor %}\n"
    '                {{- "}}" }}\n'
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- else %}\n"
    '                    {{- "]" }}\n'
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    '            {{- "[/AVAILABLE_TOOLS]" }}\n'
    "            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    "        {%- else %}\n"
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    '        {{- "[TOOL_CALLS] [" }}\n'
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n"
    '                {{- ", " }}\n'
    "            {%- else %}\n"
    '                {{- "]" + eos_token }}\n'
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n"
    "        {%- else %}\n"
    "            {%- set content = message.content %}\n"
    "        {%- endif %}\n"
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "        {%- endif %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}{{ '" + ALPACA_PREAMBLE + "' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\n### Response:\\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)

# name -> (template, the models it is the template of)
TEMPLATES: dict[str, tuple[str, str]] = {
    "chatml": (CHATML_TEMPLATE, "ChatML (OpenHermes, Nous-Hermes, many fine-tunes)"),
    "llama3": (LLAMA3_TEMPLATE, "Meta-Llama-3-*-Instruct"),
    "llama3.1": (LLAMA31_TEMPLATE, "Llama-3.1-*-Instruct, Llama-3.3-70B-Instruct"),
    "llama2": (LLAMA2_TEMPLATE, "Llama-2-*-chat"),
    "mistral": (MISTRAL_TEMPLATE, "Mistral-7B-Instruct-v0.2, Mixtral-8x7B-Instruct-v0.1"),
    "mistral-v0.3": (MISTRAL_V03_TEMPLATE, "Mistral-7B-Instruct-v0.3"),
    "gemma": (GEMMA_TEMPLATE, "gemma-*-it, gemma-2-*-it"),
    "qwen2.5": (QWEN25_TEMPLATE, "Qwen2.5-*-Instruct"),
    "phi3": (PHI3_TEMPLATE, "Phi-3-mini/medium-*-instruct, Phi-3.5-mini-instruct"),
    "alpaca": (ALPACA_TEMPLATE, "qlora's alpaca row format (the Stanford Alpaca prompt)"),
}
NAMES = tuple(TEMPLATES)
TOKENIZER = "tokenizer"  # the tokenizer's own template

# Other spellings (Axolotl's among them), compared after lower-casing and dropping "-", "_" and ".".
_ALIASES = {
    "tokenizerdefault": TOKENIZER,
    "gemma2": "gemma",
    "qwen25": "qwen2.5",
    "phi35": "phi3",
    "llama33": "llama3.1",
    "mistralv3": "mistral-v0.3",
}


def _squash(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(".", "").strip()


def is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def canonical_name(value: str) -> str | None:
    """``"qwen_25"`` -> ``"qwen2.5"``, ``"tokenizer_default"`` -> ``"tokenizer"``; None when not a known name."""
    key = _squash(value)
    by_key = {_squash(n): n for n in (*NAMES, TOKENIZER)}
    return by_key.get(key) or _ALIASES.get(key)


def check_chat_template(value: str | None) -> str | None:
    """The config value as stored: None for the tokenizer's own, a canonical name, or the Jinja text.
    Raises ``ValueError`` (one line, listing the names) for anything else."""
    if value is None:
        return None
    if is_jinja(value):
        _check_jinja_syntax(value)
        return value
    name = canonical_name(value)
    if name is None:
        raise ValueError(
            f"unknown template name (use {TOKENIZER} for the tokenizer's own, one of {', '.join(NAMES)}, or a Jinja "
            "template: text containing {{ or {%)"
        )
    return None if name == TOKENIZER else name


def _check_jinja_syntax(text: str) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the Jinja template does not parse (line {e.lineno}: {str(e.message).rstrip('.')})") from None


def resolve_chat_template(value: str | None) -> str | None:
    """The Jinja text to set on the tokenizer, or None to keep the tokenizer's own."""
    value = check_chat_template(value)
    if value is None or is_jinja(value):
        return value
    return TEMPLATES[value][0]


def describe_chat_template(value: str | None, tokenizer: Any) -> dict[str, str | None]:
    """Which template renders chat rows and where it came from, for ``qlora inspect data``."""
    value = check_chat_template(value)
    if value is None:
        has_own = bool(getattr(tokenizer, "chat_template", None))
        source = "the tokenizer's own" if has_own else "none (the tokenizer has no chat template)"
        return {"name": TOKENIZER, "source": source}
    if is_jinja(value):
        return {"name": "jinja", "source": "a Jinja template from the config"}
    return {"name": value, "source": f"named {value} (qlora's copy of {TEMPLATES[value][1]})"}


_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|<start_of_turn>|<end_of_turn>")


def untokenized_markers(value: str | None, tokenizer: Any) -> list[str]:
    """The turn markers a configured template (a name, or Jinja text) writes that are not single tokens of
    ``tokenizer``: such a marker is trained on spelled out in pieces (``<|eot_id|>`` as ``<``, ``|``, ``e``...),
    which a model of another family never learned and which generation cannot stop on. [] for the tokenizer's
    own template (its markers are its tokens)."""
    value = check_chat_template(value)
    if value is None:
        return []
    text = value if is_jinja(value) else TEMPLATES[value][0]
    missing = []
    for marker in dict.fromkeys(_MARKER.findall(text)):
        if len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1:
            missing.append(marker)
    return missing


def marker_warning(value: str | None, tokenizer: Any) -> str | None:
    """One line for a template whose markers are not tokens of the tokenizer, or None."""
    missing = untokenized_markers(value, tokenizer)
    if not missing:
        return None
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (
        f"chat_template {value if not is_jinja(value or '') else '(Jinja)'}: {shown} "
        f"{'is not a token' if len(missing) == 1 else 'are not tokens'} of this tokenizer, so training sees "
        "them spelled out in pieces; use the tokenizer's own template (chat_template: tokenizer) or one of its "
        f"family, or add them as tokens whose rows train: special_tokens: {json.dumps(missing)}"
    )
