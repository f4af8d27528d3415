from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_cli.config import RunConfig
from qlora_cli.data.pipeline import build_datasets
from qlora_cli.errors import ConfigError
from qlora_cli.model.adapter_io import load_adapter
from qlora_cli.model.loading import load_base_model, load_tokenizer
from qlora_cli.model.lora import lora_disabled, match_targets, suffixes
from qlora_cli.train.loop import run_train
from qlora_cli.train.loss import evaluate_loss

from .conftest import ARCHS, EXPECTED_LINEAR, make_config, upper_rows, write_jsonl


def loss_on(cfg: RunConfig, adapter_dir=None) -> float:
    """Token-weighted loss of base (+ adapter) on the config's training data."""
    tok = load_tokenizer(cfg)
    data = build_datasets(cfg.data, tok)
    model = load_base_model(cfg, torch.device("cpu"))
    if adapter_dir is None:
        return evaluate_loss(model, data.train, 16, tok.pad_token_id, torch.device("cpu")).loss
    load_adapter(model, adapter_dir)
    return evaluate_loss(model, data.train, 16, tok.pad_token_id, torch.device("cpu")).loss


# make test-oldest: one architecture per code path (Llama-style, Conv1D, fused qkv, learned positions), not all 8
OLDEST_ARCHS = {"llama", "gpt2", "gpt_neox", "opt"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.oldest) if a in OLDEST_ARCHS else a for a in ARCHS])
def test_every_architecture_injects_and_learns(tmp_path, model_factory, arch, quiet_console):
    folder = model_factory(arch)
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(32, seed=1))
    cfg = make_config(
        folder,
        data,
        tmp_path / "run",
        lora_target_modules="all-linear",
        max_steps=12,
        learning_rate=1e-2,
        micro_batch_size=16,
    )
    from transformers import AutoModelForCausalLM

    names = match_targets(AutoModelForCausalLM.from_pretrained(folder), "all-linear")
    assert sorted(suffixes(names)) == sorted(EXPECTED_LINEAR[arch])
    per_layer = {"gpt2": 4}.get(arch, len(EXPECTED_LINEAR[arch]))
    assert len(names) == 2 * per_layer
    result = run_train(cfg, console=quiet_console)
    assert result.steps == 12
    before, after = loss_on(cfg), loss_on(cfg, result.output_dir)
    assert after < before - 0.1, (before, after)


def test_output_folder_contents(tmp_path, llama_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(24, seed=2))
    cfg = make_config(llama_dir, data, tmp_path / "run", max_steps=3, eval_datasets=[{"path": str(data)}])
    result = run_train(cfg, console=quiet_console)
    out = result.output_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "qlora_config.yaml",
        "metrics.jsonl",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).exists(), name
    assert RunConfig(**yaml.safe_load((out / "qlora_config.yaml").read_text())) == cfg
    state = load_file(out / "adapter_model.safetensors")
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in state)  # only adapter weights
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k)  # and they trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_sec"] > 0 for r in records if r["type"] == "train")
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 1 and abs(evals[0]["eval_loss"] - result.eval_loss) < 1e-9
    assert records[-1]["type"] == "summary" and records[-1]["steps"] == 3


def test_accumulation_normalises_by_target_tokens(llama_dir, tokenizer):
    """Gradients of one step over 4 examples of different lengths are the same however the window is cut
    into micro-batches, and equal the gradient of the mean loss over all target tokens of the window."""
    from qlora_cli.config import LoRASettings, load_config
    from qlora_cli.data.pipeline import Row, collate, tokenize_row
    from qlora_cli.model.lora import inject_lora, lora_layers, lora_parameters
    from qlora_cli.train.step import Precision, accumulate_gradients

    cfg = load_config(None, base_model=str(llama_dir), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32")
    model = load_base_model(cfg, torch.device("cpu"))
    inject_lora(model, LoRASettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False))
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.weight.normal_(0, 0.1)
    params = lora_parameters(model)
    rows = [Row("r", {"prompt": "p" * (i + 1), "completion": "c" * (5 * i + 1)}) for i in range(4)]
    examples = [tokenize_row(r, "completion", tokenizer, False) for r in rows]
    precision = Precision.for_run("float32", torch.device("cpu"))

    def grads_for(cut: list[list[int]]) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        micro = [[[examples[i]] for i in idx] for idx in cut]  # micro-batches of one-example rows
        accumulate_gradients(
            model, micro, device=torch.device("cpu"), precision=precision, pad_id=tokenizer.pad_token_id
        )
        return [p.grad.clone() for p in params]

    whole = grads_for([[0, 1, 2, 3]])
    for cut in ([[0, 1], [2, 3]], [[0], [1], [2], [3]], [[3, 0, 2], [1]]):
        for a, b in zip(grads_for(cut), whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the reference: transformers' own mean over every target token of the full batch
    for p in params:
        p.grad = None
    batch = collate(examples, tokenizer.pad_token_id)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    for p, w in zip(params, whole):
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-4)
    # and the test can fail: a mean of per-micro-batch means weighs short examples more
    for p in params:
        p.grad = None
    for e in examples:
        b = collate([e], tokenizer.pad_token_id)
        (model(input_ids=b["input_ids"], labels=b["labels"]).loss / 4).backward()
    assert max((p.grad - w).abs().max().item() for p, w in zip(params, whole)) > 1e-4


@pytest.mark.parametrize(
    "fmt,rows",
    [
        ("completion", [{"prompt": "say hi: ", "completion": "hi there"}] * 8),
        ("alpaca", [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 8),
        ("chat", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi there"}]}] * 8),
        ("text", [{"text": "hi there, all"}] * 8),
    ],
)
def test_every_format_trains(tmp_path, llama_dir, quiet_console, fmt, rows):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = make_config(
        llama_dir,
        data,
        tmp_path / "run",
        datasets=[{"path": str(data), "type": fmt}],
        max_steps=8,
        learning_rate=1e-2,
        lora_target_modules="all-linear",
        allow_degenerate_data=True,  # eight copies of one row, to overfit it: the guard would refuse them
    )
    result = run_train(cfg, console=quiet_console)
    losses = [r["loss"] for r in result.history if r["type"] == "train"]
    assert losses[-1] < losses[0] * 0.8, losses


def test_refuses_a_non_empty_output_dir_and_a_file(tmp_path, llama_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=3))
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = make_config(llama_dir, data, out, max_steps=1)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        run_train(cfg, console=quiet_console)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(ConfigError, match="is not a qlora run folder"):  # --force replaces only a run folder
        run_train(cfg, force=True, console=quiet_console)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    run_train(cfg.model_copy(update={"output_dir": str(tmp_path / "new")}), console=quiet_console)
    run_train(cfg.model_copy(update={"output_dir": str(tmp_path / "new")}), force=True, console=quiet_console)
    assert (tmp_path / "new" / "adapter_model.safetensors").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        run_train(make_config(llama_dir, data, tmp_path / "f", max_steps=1), console=quiet_console)


@pytest.mark.oldest
def test_gradient_checkpointing_gives_the_same_step(tmp_path, llama_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=4))
    outs = []
    for ckpt in (False, True):
        cfg = make_config(
            llama_dir,
            data,
            tmp_path / f"run{ckpt}",
            gradient_checkpointing=ckpt,
            max_steps=2,
            optimizer="adamw_torch",
            lora_target_modules="all-linear",
        )
        outs.append(run_train(cfg, console=quiet_console))
    a, b = (load_file(o.output_dir / "adapter_model.safetensors") for o in outs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.oldest
def test_bf16_autocast_trains_on_cpu(tmp_path, llama_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=5))
    cfg = make_config(
        llama_dir,
        data,
        tmp_path / "run",
        bnb_4bit_compute_dtype="bfloat16",
        max_steps=6,
        learning_rate=1e-2,
        lora_target_modules="all-linear",
    )
    result = run_train(cfg, console=quiet_console)
    losses = [r["loss"] for r in result.history if r["type"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    state = load_file(result.output_dir / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())  # master weights stay float32


def test_lora_disabled_equals_base(tmp_path, llama_dir, quiet_console):
    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(16, seed=6))
    cfg = make_config(llama_dir, data, tmp_path / "run", max_steps=4, learning_rate=1e-2)
    run_train(cfg, console=quiet_console)
    base = load_base_model(cfg, torch.device("cpu"))
    adapted = load_base_model(cfg, torch.device("cpu"))
    load_adapter(adapted, cfg.output_dir)
    ids = torch.randint(6, 90, (2, 8))
    with torch.no_grad(), lora_disabled(adapted):
        torch.testing.assert_close(adapted(ids).logits, base(ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        assert (adapted(ids).logits - base(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_the_schedule_is_transformers_own_without_importing_it(kind, warmup):
    """build_scheduler gives get_scheduler's learning rate at every step (and one past the end), and each loads
    the other's state (checkpoints written with transformers' schedule resume)."""
    from transformers import get_scheduler

    from qlora_cli.config import load_config
    from qlora_cli.train.loop import build_scheduler

    cfg = load_config(None, base_model="x", datasets=[{"path": "x"}], lr_scheduler=kind, warmup_steps=warmup)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    ours = build_scheduler(cfg, optimizer(), 11)
    theirs = get_scheduler(name, optimizer(), num_warmup_steps=warmup, num_training_steps=11)
    seen = set()
    for _ in range(13):
        assert ours.get_last_lr() == theirs.get_last_lr()
        seen.add(round(ours.get_last_lr()[0], 6))
        ours.optimizer.step(), theirs.optimizer.step()
        ours.step(), theirs.step()
    assert len(seen) == 1 if kind == "constant" and not warmup else len(seen) > 3  # it moved where it should
    resumed = build_scheduler(cfg, optimizer(), 11)
    resumed.load_state_dict(theirs.state_dict())
    assert resumed.get_last_lr() == theirs.get_last_lr() and resumed.last_epoch == 13
