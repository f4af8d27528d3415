"""The Ollama Modelfile written beside an exported GGUF file, and the commands that run the file.

The chat template is translated to Ollama's template syntax (Go templates over ``.Messages``) for the
families qlora names (ChatML/Qwen, Llama 3, Gemma, Mistral, Phi-3), recognised by their turn markers; for any
other template the Modelfile has no TEMPLATE and Ollama falls back to the Jinja template stored in the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console

from qlora_cli.export.gguf_arch import QUANTS

CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
GEMMA = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}{{- else }}'
    '<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
    '{{ if $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $system = "" }}{{- end }}{{- end }}'
    "<start_of_turn>model\n"
)
MISTRAL = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}'
    '{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}\n\n{{ end }}{{ .Content }} [/INST]'
    '{{ $system = "" }}{{- else }}{{ .Content }}</s>{{- end }}{{- end }}'
)
PHI3 = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"

# (marker in the Jinja template, Ollama template, stop strings)
FAMILIES = (
    ("<|im_start|>", CHATML, ["<|im_start|>", "<|im_end|>"]),
    ("<|start_header_id|>", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("<start_of_turn>", GEMMA, ["<start_of_turn>", "<end_of_turn>"]),
    ("[INST]", MISTRAL, ["[INST]", "[/INST]"]),
    ("<|end|>", PHI3, ["<|end|>", "<|user|>", "<|assistant|>"]),
)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def modelfile_path(gguf_file: Path, quant: str) -> Path:
    """support-bot.Q8_0.gguf -> support-bot.Modelfile (the quant suffix dropped when it names the quant)."""
    stem = gguf_file.name[: -len(".gguf")] if gguf_file.name.lower().endswith(".gguf") else gguf_file.name
    stem = re.sub(rf"[.-]{re.escape(quant)}$", "", stem, flags=re.IGNORECASE)
    return gguf_file.with_name(f"{stem}.Modelfile")


def ollama_template(chat_template: str | None) -> tuple[str, list[str], str | None] | None:
    """(Ollama template, stop strings, default system prompt) for a family qlora knows; None otherwise."""
    if not chat_template:
        return None
    for marker, template, stops in FAMILIES:
        if marker in chat_template:
            system = QWEN_DEFAULT_SYSTEM if QWEN_DEFAULT_SYSTEM in chat_template else None
            return template, stops, system
    return None


def modelfile_text(gguf_file: Path, chat_template: str | None) -> str:
    lines = [f"FROM ./{gguf_file.name}"]
    found = ollama_template(chat_template)
    if found is None:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF file")
    else:
        template, stops, system = found
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_file: Path, quant: str, tokenizer: Any, console: Console) -> Path:
    """Write the Modelfile beside ``gguf_file`` and print how to run the file. Returns the Modelfile's path."""
    path = modelfile_path(gguf_file, quant)
    template = getattr(tokenizer, "chat_template", None)
    path.write_text(modelfile_text(gguf_file, template if isinstance(template, str) else None))
    name = re.sub(r"[^a-z0-9._-]", "-", path.stem.lower())
    console.print(
        f"[green]wrote[/green] {gguf_file} ({QUANTS[quant][0]}) and {path}\n"
        f"  ollama create {name} -f {path}\n"
        f"  llama-cli -m {gguf_file} -cnv        # llama.cpp chat, with the chat template in the file\n"
        f"  llama-server -m {gguf_file} --port 8080"
    )
    return path
