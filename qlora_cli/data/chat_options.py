"""How one dataset's conversations are read and trained (``ChatOptions``): the run's ``train_on`` and
``train_on_reasoning``, the dataset's role map and tools. Kept apart from ``data.chat`` so that reading rows
(``data.sources``) can attach them without importing the tokenizing code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_cli.errors import DataError


@dataclass(frozen=True)
class ChatOptions:
    """How conversations of one dataset are read and trained (the run's and the dataset's settings)."""

    train_on: str = "all_assistant"
    train_on_reasoning: bool = True
    roles: tuple[tuple[str, str], ...] = ()  # extra speaker name -> role
    tools: str | None = None  # the dataset's tool definitions (JSON text), for rows without their own

    def key(self) -> dict[str, Any]:
        """What changes the tokens, for the tokenization cache's key."""
        return {"train_on": self.train_on, "reasoning": self.train_on_reasoning, "roles": self.roles,
                "tools": self.tools}  # fmt: skip


DEFAULT = ChatOptions()


def options_for(spec: Any, settings: Any) -> ChatOptions:
    """The ``ChatOptions`` of dataset ``spec`` under the run's ``DataSettings``; ``DataError`` for a tools file
    that cannot be read."""
    roles: dict[str, str] = {}
    for key, target in (spec.roles or {}).items():
        if isinstance(target, list):  # Axolotl's {our role: [their names]}
            roles.update({name: key for name in target})
        else:
            roles[key] = target
    tools = spec.tools
    if isinstance(tools, str):
        path = Path(tools).expanduser()
        try:
            tools = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise DataError(f"dataset {spec.path}: cannot read tools file {tools} ({e.strerror or e})") from None
        except ValueError as e:
            raise DataError(f"dataset {spec.path}: tools file {tools} is not JSON ({e})") from None
    if tools is not None:
        tools = tools_list(tools, f"dataset {spec.path}: tools")
    return ChatOptions(
        train_on=getattr(settings, "train_on", "all_assistant"),
        train_on_reasoning=getattr(settings, "train_on_reasoning", True),
        roles=tuple(sorted(roles.items())),
        tools=None if tools is None else json.dumps(tools),  # key order kept: templates render it
    )


def tools_list(tools: Any, where: str) -> list[dict[str, Any]]:
    """Tool definitions as the templates read them, ``[{type: function, function: {name, ...}}]`` (a bare
    ``{name, parameters}`` is wrapped); ``DataError`` for anything else."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise DataError(f"{where} is a string that is not JSON") from None
    if not isinstance(tools, list):
        raise DataError(f"{where} must be a list of function definitions")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}[{i}] is not a function definition ({{type: function, function: {{name, ...}}}})")
        out.append(tool)
    return out
