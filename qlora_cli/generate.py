"""``qlora generate``: one prompt through a run's adapter (or a base alone), streamed to the terminal.

It decodes with the server's ``Engine`` (a batch of one), so ``qlora generate`` and ``qlora serve`` give the same
tokens for the same prompt and settings, stop strings and end-of-turn handling included.
"""

from __future__ import annotations

from collections.abc import Callable

from qlora_cli.serving.engine import Engine, Generation, SamplingParams, end_of_turn_ids, eos_ids


def run_generate(
    folder: str,
    prompt: str,
    params: SamplingParams,
    chat: bool = False,
    base: str | None = None,
    device: str = "auto",
    write: Callable[[str], None] | None = None,
) -> Generation:
    """Generate from one prompt with a run/adapter folder (or a model folder: the base alone), calling
    ``write`` with each new piece of text. Returns the finished sequence."""
    from pathlib import Path

    from qlora_cli.config import ModelSettings, QuantSettings
    from qlora_cli.errors import ModelError
    from qlora_cli.model.loading import DTYPES, load_base_model, load_tokenizer, quiet_libraries, resolve_device
    from qlora_cli.run_folder import folder_kind, load_adapted_model, open_run

    quiet_libraries()
    torch_device = resolve_device(device)
    path = Path(folder).expanduser()
    if folder_kind(path) != "model":  # a run, checkpoint or adapter (open_run says what is wrong with any other)
        run = open_run(path, base=base)
        settings = run.model
        model, tokenizer = load_adapted_model(run, torch_device)
    else:  # a model folder: the base alone, quantized as `qlora train` would
        settings = ModelSettings(str(path), quant=QuantSettings())
        model, tokenizer = load_base_model(settings, torch_device), load_tokenizer(settings)
        model.eval()
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(f"{folder}: the tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    engine = Engine(model, None, max_batch_size=1, compute_dtype=DTYPES[settings.quant.compute_dtype])
    limit = engine.max_length
    if limit and len(prompt_ids) + params.max_tokens > limit:
        raise ModelError(
            f"the prompt ({len(prompt_ids)} tokens) plus --max-tokens {params.max_tokens} exceeds the model's "
            f"context length of {limit} tokens"
        )
    eos = eos_ids(tokenizer, model) | (end_of_turn_ids(tokenizer) if chat else frozenset())
    seq = Generation(prompt_ids, tokenizer, params, eos_ids=eos)
    if write is not None:
        seq.on_text = lambda _, delta: write(delta) if delta else None
    engine.run([seq])
    if seq.finish_reason == "error":
        raise RuntimeError(seq.error)
    return seq
