"""The ``qlora`` command line: each command loads its input, calls one function, and turns a user error
into one line on stderr with exit code 2 (``--debug`` shows the traceback instead)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from qlora_cli.errors import QLoRAError

app = typer.Typer(
    name="qlora",
    help="Fine-tune LLMs with LoRA on a 4-bit quantized base.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def run_command(fn: Callable[[], Any], debug: bool) -> Any:
    """Call ``fn``; a ``QLoRAError`` becomes one line and exit code 2."""
    try:
        return fn()
    except QLoRAError as e:
        if debug:
            raise
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=e.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(code=130) from None


@app.callback()
def _root() -> None:
    """Fine-tune LLMs with LoRA on a 4-bit quantized base."""


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="The run's YAML config.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: --set learning_rate=1e-4 (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty output_dir.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in output_dir.")
    ] = False,
    debug: Debug = False,
) -> None:
    """Fine-tune a LoRA adapter on a 4-bit base, as the config says."""

    def go() -> None:
        from qlora_cli.config import load_config
        from qlora_cli.train import train as run_train

        cfg = load_config(config, (set_ or []) + (["resume_from_checkpoint=auto"] if resume else []))
        run_train(cfg, force=force, console=err)

    run_command(go, debug)


def main() -> None:
    app(prog_name="qlora")


if __name__ == "__main__":
    sys.exit(main())
