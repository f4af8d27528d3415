"""The Ollama Modelfile written beside an exported GGUF file, and the commands that run the file.

Ollama does not run Jinja chat templates: a Modelfile's TEMPLATE is a Go template over ``.Messages``. qlora
writes one for the families it knows (ChatML and Qwen 2.5, Llama 3, Gemma, Mistral, Phi-3), and only when it
renders exactly what the run's own chat template renders: each Go template here has a Python twin (the same
text, written out), and the twin's output is compared with the Jinja template's on a few conversations (with
and without a system message, several turns). Where none matches (Llama 2's <<SYS>> template, Llama 3.1's
dated system block, anything else) the Modelfile has no TEMPLATE: Ollama then picks the closest of its own
built-in templates from the chat template stored in the file, and the output says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.errors import ModelError

Messages = list[dict[str, str]]


def _chatml(messages: Messages) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _llama3(messages: Messages) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _system_into_first_turn(messages: Messages) -> list[tuple[str, str]]:
    """(role, text) per turn, a system message put before the next turn's text with a blank line."""
    out, system = [], ""
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
            continue
        out.append((m["role"], f"{system}\n\n{m['content']}" if system else m["content"]))
        system = ""
    return out


def _gemma(messages: Messages) -> str:
    turns = "".join(
        f"<start_of_turn>{'model' if role == 'assistant' else role}\n{text}<end_of_turn>\n"
        for role, text in _system_into_first_turn(messages)
    )
    return turns + "<start_of_turn>model\n"


def _mistral(messages: Messages) -> str:
    return "".join(
        f"[INST] {text} [/INST]" if role == "user" else f"{text}</s>"
        for role, text in _system_into_first_turn(messages)
    )


def _phi3(messages: Messages) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"


@dataclass(frozen=True)
class Family:
    name: str
    template: str  # Ollama's Go template
    render: Callable[[Messages], str]  # the same text, in Python
    stops: tuple[str, ...]
    system: str | None = None  # Ollama's SYSTEM: the default system message the chat template adds


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
FAMILIES = (
    Family(
        "chatml",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        _chatml,
        ("<|im_start|>", "<|im_end|>"),
    ),
    Family(
        "qwen2.5",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        _chatml,
        ("<|im_start|>", "<|im_end|>"),
        QWEN_SYSTEM,
    ),
    Family(
        "llama3",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        _llama3,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    Family(
        "gemma",
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}{{- else }}'
        '<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        '{{ if $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $system = "" }}{{- end }}{{- end }}'
        "<start_of_turn>model\n",
        _gemma,
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    Family(
        "mistral",
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}'
        '{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}\n\n{{ end }}{{ .Content }} [/INST]'
        '{{ $system = "" }}{{- else }}{{ .Content }}</s>{{- end }}{{- end }}',
        _mistral,
        ("[INST]", "[/INST]"),
    ),
    Family(
        "phi3",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        _phi3,
        ("<|end|>", "<|user|>", "<|assistant|>"),
    ),
)

SYSTEM = {"role": "system", "content": "You answer in one word."}
PROBES: tuple[Messages, ...] = (
    [{"role": "user", "content": "What colour is the sky?"}],
    [SYSTEM, {"role": "user", "content": "What colour is the sky?"}],
    [
        SYSTEM,
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ],
)


def matching_family(tokenizer: Any) -> Family | None:
    """The family whose Go template renders what the tokenizer's chat template renders on every probe; None
    if none does."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    # a template that writes BOS as text (Llama 3, Mistral, Gemma) for a tokenizer that adds BOS itself: llama.cpp
    # and Ollama add BOS by token, so the Go template leaves it out
    bos = getattr(tokenizer, "bos_token", None) or ""
    ids = tokenizer("a")["input_ids"]
    if not (bos and ids and ids[0] == tokenizer.bos_token_id):
        bos = ""
    rendered = []
    for messages in PROBES:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that refuses a probe (e.g. system messages) matches nothing
            return None
        rendered.append(text[len(bos) :] if bos and text.startswith(bos) else text)
    candidates = list(FAMILIES)
    default = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", rendered[0], re.DOTALL)
    if default:  # a ChatML template that adds its own system message when there is none (SmolLM2, Qwen 2)
        chatml = FAMILIES[0]
        candidates.append(Family("chatml", chatml.template, chatml.render, chatml.stops, default.group(1)))
    for family in candidates:
        twin = [family.render(_with_default_system(m, family.system)) for m in PROBES]
        if twin == rendered:
            return family
    return None


def _with_default_system(messages: Messages, system: str | None) -> Messages:
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def modelfile_path(gguf_file: Path, quant: str) -> Path:
    """support-bot.Q8_0.gguf -> support-bot.Modelfile (the quant suffix dropped when it names the quant)."""
    stem = gguf_file.name[: -len(".gguf")] if gguf_file.name.lower().endswith(".gguf") else gguf_file.name
    stem = re.sub(rf"[.-]{re.escape(quant)}$", "", stem, flags=re.IGNORECASE)
    return gguf_file.with_name(f"{stem}.Modelfile")


def modelfile_text(gguf_file: Path, family: Family | None) -> str:
    lines = [f"FROM ./{gguf_file.name}"]
    if family is None:
        lines.append(
            "# no TEMPLATE: the run's chat template is not one qlora writes in Ollama's syntax exactly; Ollama "
            "picks the closest of its built-in templates from the chat template stored in the GGUF file"
        )
    else:
        lines.append(f'TEMPLATE """{family.template}"""')
        if family.system:
            lines.append(f'SYSTEM """{family.system}"""')
        lines += [f'PARAMETER stop "{s}"' for s in family.stops]
    return "\n".join(lines) + "\n"


def check_modelfile(path: Path, gguf_file: Path, force: bool) -> None:
    """Refuse to replace a Modelfile that is not this file's (hand-edited, or another quant's) without --force."""
    if path.is_dir():
        raise ModelError(f"{path} is a folder; the Modelfile for {gguf_file.name} goes there")
    if path.exists() and not force:
        first = path.read_text(errors="replace").splitlines()[:1]
        if first != [f"FROM ./{gguf_file.name}"]:
            raise ModelError(f"{path} exists and is not this file's Modelfile (use --force to replace it)")


def run_commands(gguf_file: Path, modelfile: Path, family: Family | None) -> str:
    name = re.sub(r"[^a-z0-9._-]", "-", modelfile.stem.lower())
    how = f"template: {family.name}" if family else "no TEMPLATE: Ollama picks a built-in one"
    return (
        f"  ollama create {name} -f {modelfile}        # {how}\n"
        f"  llama-cli -m {gguf_file} -cnv        # llama.cpp chat, with the chat template in the file\n"
        f"  llama-server -m {gguf_file} --port 8080"
    )
