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

QWEN25_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{% set turns = messages[1:] %}"
    "{% else %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% set turns = messages %}"
    "{% endif %}"
    "{% for message in turns %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
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
    "llama2": (LLAMA2_TEMPLATE, "Llama-2-*-chat"),
    "mistral": (MISTRAL_TEMPLATE, "Mistral-7B-Instruct-v0.2, Mixtral-8x7B-Instruct-v0.1"),
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
