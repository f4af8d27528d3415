"""The ``qlora`` command line: each command loads its input, calls one function, and turns a user error
into one line on stderr with exit code 2 (``--debug`` shows the traceback instead)."""

from __future__ import annotations

import errno
import os
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
    except OSError as e:
        if debug or e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename}{f' -> {e.filename2}' if e.filename2 else ''})" if e.filename else ""
        err.print(f"[bold red]error:[/bold red] {e.strerror}{where}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(code=130) from None


# a full disk, a quota, a read-only file system, a folder the user may not write: the machine's state,
# fixable by the user, not a bug
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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
        from qlora_cli.train.loop import run_train

        cfg = load_config(config, (set_ or []) + (["resume_from_checkpoint=auto"] if resume else []))
        run_train(cfg, force=force, console=err)

    run_command(go, debug)


@app.command()
def preprocess(
    config: Annotated[Path, typer.Argument(help="The run's YAML config.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: --set sequence_len=1024 (repeatable).")
    ] = None,
    debug: Debug = False,
) -> None:
    """Tokenize the config's datasets into the cache ($QLORA_CACHE), so train starts without tokenizing."""

    def go() -> None:
        from qlora_cli.config import load_config
        from qlora_cli.data.preprocess import run_preprocess

        cfg = load_config(config, set_ or [])
        run_preprocess(cfg, lambda line: err.print(line, highlight=False, soft_wrap=True))

    run_command(go, debug)


@app.command("eval")
def eval_(
    folders: Annotated[
        list[Path], typer.Argument(help="Run/adapter folders (compared on their base) or model folders.")
    ],
    data: Annotated[str | None, typer.Option("--data", help="Eval data file; default: the run's eval data.")] = None,
    type_: Annotated[
        str | None,
        typer.Option("--type", help="completion, alpaca, chat, text or preference; default: read off the first row."),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split, for a datasets hub name.")] = "train",
    base: Annotated[str | None, typer.Option("--base", help="Load the adapters on this base model.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate the first N examples.")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="Generation length; default: longest answer + 8.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Default: the run's eval batch.")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Show N example generations.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Do not score the base model.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Compute dtype (float32, bfloat16, float16); default: as trained.")
    ] = None,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="Model folders: quantize to NF4.")] = False,
    debug: Debug = False,
) -> None:
    """Loss, perplexity and exact match of adapters beside their base model, on eval data."""

    def go() -> None:
        from qlora_cli.evaluate import EvalOptions, run_eval

        options = EvalOptions(
            data=data, fmt=type_, split=split, base=base, limit=limit, max_new_tokens=max_new_tokens,
            batch_size=batch_size, include_base=not no_base, device=device, dtype=dtype, load_in_4bit=load_in_4bit,
        )  # fmt: skip
        run_eval(folders, options, json_path=json_path, samples=samples, console=Console(soft_wrap=True), log=err)

    run_command(go, debug)


@app.command()
def merge(
    run: Annotated[Path, typer.Argument(help="A run folder, or any folder with a PEFT LoRA adapter.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged model.")],
    base: Annotated[str | None, typer.Option("--base", help="Base model folder or hub id; default: the run's.")] = None,
    base_weights: Annotated[
        str, typer.Option("--base-weights", help="dequantized (the NF4 weights the adapter trained on) or original.")
    ] = "dequantized",
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="bfloat16, float16 or float32; default: the checkpoint's 16-bit dtype."),
    ] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 2GB.")] = "5GB",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare merged and adapter logits.")] = True,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda (merge math and self-check).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    debug: Debug = False,
) -> None:
    """Merge a run's adapter into its base: full weights that plain transformers and vLLM load."""

    def go() -> Any:
        from qlora_cli.merge import run_merge

        return run_merge(
            run, output, base=base, base_weights=base_weights, dtype=dtype, max_shard_size=max_shard_size,
            force=force, verify=verify, device=device, console=err,
        )  # fmt: skip

    result = run_command(go, debug)
    if result.check is not None and not result.check.passed:
        raise typer.Exit(code=1)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run folder, or any folder with a PEFT LoRA adapter.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .gguf file to write.")],
    fmt: Annotated[
        str, typer.Option("--format", help="gguf (the merged model) or gguf-lora (the adapter, for llama.cpp --lora).")
    ] = "gguf",
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="gguf: f32, f16, bf16, q8_0 (default), q6_k, q4_k_m, q4_0, q4_1, q5_0, q5_1; gguf-lora: f32 (default), f16.",
        ),
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model folder or hub id; default: the run's.")] = None,
    base_weights: Annotated[
        str, typer.Option("--base-weights", help="dequantized (the NF4 weights the adapter trained on) or original.")
    ] = "dequantized",
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Read the file back and compare with the adapter.")
    ] = True,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda (merge math and self-check).")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    debug: Debug = False,
) -> None:
    """Export a run as GGUF for llama.cpp, Ollama and LM Studio (merged and quantized), or its adapter as a GGUF LoRA."""

    def go() -> Any:
        from qlora_cli.export import run_export

        return run_export(
            run, output, fmt=fmt, quant=quant, base=base, base_weights=base_weights, force=force, verify=verify,
            device=device, console=err,
        )  # fmt: skip

    result = run_command(go, debug)
    if result.check is not None and not result.check.passed:
        err.print("[red]the exported file failed its self-check and was removed[/red]")
        raise typer.Exit(code=1)


@app.command()
def generate(
    run: Annotated[Path, typer.Argument(help="A run or adapter folder (or a model folder: the base alone).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt; - reads it from stdin.")],
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as one user message (chat template).")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0: greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model folder or hub id; default: the run's.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    debug: Debug = False,
) -> None:
    """Generate from one prompt with a trained adapter, streaming the text to the terminal."""

    def go() -> None:
        from qlora_cli.generate import run_generate
        from qlora_cli.serving.engine import SamplingParams

        text = sys.stdin.read() if prompt == "-" else prompt
        params = SamplingParams(max_tokens, temperature, top_p, list(stop or []), seed)
        run_generate(str(run), text, params, chat, base, device, write=_write_now)
        sys.stdout.write("\n")

    run_command(go, debug)


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
def serve(
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", "-a", help="name=run_folder to serve (repeatable).")
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model folder; default: the adapters' base.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes the server.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Most requests decoded at once.")] = 8,
    base_name: Annotated[
        str | None, typer.Option("--base-name", help="The base's model name; default: its folder name (or 'base').")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="QLORA_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health.",
        ),
    ] = None,
    allow_runtime_lora: Annotated[
        bool, typer.Option("--allow-runtime-lora", help="Enable /v1/load_lora_adapter and /v1/unload_lora_adapter.")
    ] = False,
    lora_root: Annotated[
        list[str] | None,
        typer.Option("--lora-root", help="Folder runtime-loaded adapters must lie under (repeatable)."),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Run Python shipped with the base model (never a client's).")
    ] = False,
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", min=1, help="Largest adapter rank accepted.")] = 64,
    max_loras: Annotated[int, typer.Option("--max-loras", min=1, help="Most adapters loaded at once.")] = 16,
    debug: Debug = False,
) -> None:
    """Serve many adapters from one base over an OpenAI-compatible HTTP API."""

    def go() -> None:
        from qlora_cli.model.loading import quiet_libraries
        from qlora_cli.serving.app import run_serve
        from qlora_cli.serving.policy import ServePolicy, resolve_roots

        # click reads an empty variable as unset, which would turn authentication off
        key = os.environ["QLORA_API_KEY"] if api_key is None and "QLORA_API_KEY" in os.environ else api_key
        try:
            policy = ServePolicy(
                trust_remote_code=trust_remote_code,
                allow_runtime_lora=allow_runtime_lora,
                lora_roots=resolve_roots(lora_root or []),
                api_key=key,
                max_lora_rank=max_lora_rank,
                max_loras=max_loras,
            )
        except ValueError as e:
            raise QLoRAError(str(e)) from None
        quiet_libraries()
        run_serve(base, adapter or [], host, port, device, max_batch_size, base_name, console=err, policy=policy)

    run_command(go, debug)


@app.command()
def inspect(
    target: Annotated[str, typer.Argument(help="config.yaml, a run/adapter folder, or `data`.")],
    config: Annotated[str | None, typer.Argument(help="With `data`: the config whose data to inspect.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    gpu_memory: Annotated[
        str | None, typer.Option("--gpu-memory", help="GPU size for the plan, e.g. 24GB: does it fit, largest batch.")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Plan for cuda or cpu; default: the config's.")] = None,
    examples: Annotated[int, typer.Option("--examples", min=0, help="Tokenized examples to show (data).")] = 3,
    processes: Annotated[
        int, typer.Option("--processes", help="Plan memory per process of this many (accelerate/torchrun).")
    ] = 1,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="With --processes: FSDP (sharded) instead of DDP.")] = False,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: --set chat_template=llama3 (repeatable).")
    ] = None,
    debug: Debug = False,
) -> None:
    """Understand a config (targets, memory plan), its data (`inspect data config.yaml`) or an adapter."""

    def go() -> None:
        from rich.console import Console

        from qlora_cli.errors import ConfigError
        from qlora_cli.inspect.report import run_inspect

        if device not in (None, "cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
        console = Console(soft_wrap=True)
        run_inspect(
            target,
            config,
            as_json=json_,
            gpu_memory=gpu_memory,
            examples=examples,
            device=device,
            console=console,
            overrides=overrides,
            processes=processes,
            fsdp=fsdp,
        )

    run_command(go, debug)


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (their metrics.jsonl); several are overlaid.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="PNG to write; default: RUN/loss.png, or ./curves.png.")
    ] = None,
    debug: Debug = False,
) -> None:
    """Draw train loss (raw and smoothed), eval loss, learning rate and gradient norm of one or more runs."""

    def go() -> None:
        from qlora_cli.plot import default_output, run_plot

        path = run_plot(list(runs), output or default_output(list(runs)))
        err.print(f"wrote {path}", highlight=False)

    run_command(go, debug)


def main() -> None:
    try:
        app(prog_name="qlora")
    except SystemExit as e:
        if isinstance(e.code, int | None):
            quick_exit(e.code or 0)
        raise
    quick_exit(0)


def quick_exit(code: int) -> None:
    """End the process without the interpreter's teardown once the command is done: unloading torch,
    transformers and bitsandbytes module by module took 1-1.6 s after the work was finished. The exit handlers
    still run and the streams are flushed first; with another thread still running (it may be writing) or a
    process group still up, or under a profiler, debugger or coverage tool (they report after the code returns),
    the process ends the usual way."""
    import atexit
    import threading

    torch_dist = sys.modules.get("torch.distributed")
    distributed = torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized()
    if threading.active_count() > 1 or distributed or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
