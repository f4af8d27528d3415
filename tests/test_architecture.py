"""The package's shape: no import cycles (counting imports inside functions), kernels below the layers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the qlora_cli modules it imports anywhere in its file}; ``from pkg import mod`` counts as mod."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "qlora_cli.model.lora" in graph["qlora_cli.model.adapter_io"]
    assert "qlora_cli.train.loop" in graph["qlora_cli.cli"]  # cli imports each command's module when it runs


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_kernels_import_nothing_from_the_layers_above():
    """Only the user-error classes, which import nothing."""
    above = {
        name: sorted(m for m in deps if not m.startswith("qlora_cli.kernels") and m != "qlora_cli.errors")
        for name, deps in import_graph().items()
        if name.startswith("qlora_cli.kernels")
    }
    assert above == {name: [] for name in above}


def test_the_labels_ignore_value_is_the_same_in_data_and_the_fused_loss():
    from qlora_cli.data.pipeline import IGNORE_INDEX
    from qlora_cli.kernels import cross_entropy

    assert cross_entropy.IGNORE_INDEX == IGNORE_INDEX == -100


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_training_never_reaches_the_serving_package():
    """train, merge and eval stand without the server: serving depends on them, never the other way."""
    graph = import_graph()
    for root in ("qlora_cli.train.loop", "qlora_cli.merge", "qlora_cli.evaluate"):
        assert sorted(m for m in reachable(graph, root) if m.startswith("qlora_cli.serving")) == [], root
    assert "qlora_cli.model.loading" in reachable(graph, "qlora_cli.serving.server")  # the walk does see real imports


COMMANDS = ("merge", "export", "serving", "evaluate", "inspect", "generate", "memory_plan", "cli")


def _imports_of(prefix: str, graph: dict[str, set[str]]) -> dict[str, list[str]]:
    return {name: sorted(deps) for name, deps in graph.items() if name == prefix or name.startswith(prefix + ".")}


def _stage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_the_stages_import_only_downwards():
    """data -> model -> train -> the commands: a stage imports nothing from a later one. Two named exceptions:
    the model's tokenizer loading takes chat templates from data (a leaf: it imports only errors), and
    ``data.preprocess`` is a command of its own that loads the tokenizer."""
    graph = import_graph()
    later = {"data": {"model", "train", *COMMANDS}, "model": {"train", *COMMANDS}, "train": set(COMMANDS)}
    wrong = []
    for stage, forbidden in later.items():
        for name, deps in _imports_of(f"qlora_cli.{stage}", graph).items():
            if name == "qlora_cli.data.preprocess":
                continue
            wrong += [(name, d) for d in deps if _stage(d) in forbidden]
    assert wrong == []
    model_from_data = {
        d for name, deps in _imports_of("qlora_cli.model", graph).items() for d in deps if _stage(d) == "data"
    }
    assert model_from_data == {"qlora_cli.data.chat_templates"}
    assert graph["qlora_cli.data.chat_templates"] <= {"qlora_cli.errors"}


def test_file_names_are_spelled_only_in_the_layout_module():
    """Every name of a file or folder qlora writes lives in ``layout``; other modules import it."""
    import re

    names = ["qlora_config.yaml", "metrics.jsonl", "adapter_model.safetensors", "adapter_config.json",
             "trainer_state.json", "best_eval.json", "trackers.json", "optimizer.pt", "scheduler.pt"]  # fmt: skip
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "layout.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for name in names:
                if re.search(rf"[\"']{re.escape(name)}[\"']", code):
                    found.append(f"{path.relative_to(PACKAGE)}:{number}: {name}")
    assert found == []
