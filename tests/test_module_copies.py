"""Whole trained copies of the embedding and output head (``modules_to_save``): equal to PEFT's on the same 4-bit
base, saved in its format and loaded by it, resumed bit-exact, merged, and with new tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_cli.config import load_config
from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora_cli.model.adapter_io import save_adapter
from qlora_cli.model.loading import DTYPES, bnb_config, disable_cpu_weight_repacking, load_base_model, load_tokenizer
from qlora_cli.model.lora import inject_lora, lora_disabled, lora_layers
from qlora_cli.model.token_rows import TrainedCopy, row_modules, train_copies
from qlora_cli.train.loop import run_train
from tests.conftest import interrupted_then_resumed, make_config, write_jsonl
from tests.test_cli import assert_user_error, run_cli
from tests.test_token_rows import NEW, _batch, _rel, _tool_rows

CPU = torch.device("cpu")
BOTH = ["embed_tokens", "lm_head"]


pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def _peft_base(folder, cfg):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config(cfg.quant), dtype=DTYPES["float32"], device_map={"": "cpu"}
    )
    base.config.use_cache = False
    disable_cpu_weight_repacking(base)
    return base


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # an untied head, and one tied to the embedding
def test_copies_equal_peft_modules_to_save_on_the_same_4bit_base_and_peft_loads_the_folder(
    model_factory, arch, tmp_path
):
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = model_factory(arch, initializer_range=0.1, layers=1, hidden=32)
    cfg = load_config(None, base_model=str(folder), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32",
                      lora_r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=BOTH)  # fmt: skip
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg, CPU)
    inject_lora(model, cfg.lora)
    tied = arch == "gemma2"
    assert train_copies(model, BOTH) == BOTH
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in row_modules(model):
            m.rows.add_(torch.randn(m.rows.shape, generator=g) * 0.05)  # a tied head shares the embedding's copy
        for _, m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    peft = get_peft_model(_peft_base(folder, cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj"], modules_to_save=list(BOTH), ensure_weight_tying=tied))  # fmt: skip
    modules = dict(peft.base_model.model.named_modules())
    with torch.no_grad():
        for name, m in lora_layers(model):
            modules[name].lora_A["default"].weight.copy_(m.lora_A.weight)
            modules[name].lora_B["default"].weight.copy_(m.lora_B.weight)
        for name, m in row_modules(model):
            modules[name].modules_to_save["default"].weight.copy_(m.rows)
    batch = _batch(tokenizer)
    model.train(), peft.train()
    ours, theirs = model(**batch), peft(**batch)
    assert _rel(ours.logits, theirs.logits) < 1e-5
    ours.loss.backward()
    theirs.loss.backward()
    embed = model.get_input_embeddings()
    peft_embed = modules["model.embed_tokens"].modules_to_save["default"].weight
    assert isinstance(embed, TrainedCopy) and embed.rows.grad.norm() > 0
    assert _rel(embed.rows.grad, peft_embed.grad) < 1e-4  # a tied copy: the embedding's and the head's terms
    if not tied:
        head = model.get_output_embeddings()
        assert _rel(head.rows.grad, modules["lm_head"].modules_to_save["default"].weight.grad) < 1e-4
    for name, m in lora_layers(model):
        assert _rel(m.lora_A.weight.grad, modules[name].lora_A["default"].weight.grad) < 1e-4, name
    with lora_disabled(model), torch.no_grad():  # the base alone: the copies off too
        assert _rel(model(**batch).logits, ours.logits) > 1e-3

    model.eval()
    save_adapter(model, tmp_path, cfg.lora, str(folder))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["modules_to_save"] == BOTH and config["ensure_weight_tying"] == tied
    keys = set(load_file(str(tmp_path / ADAPTER_WEIGHTS)))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    loaded = PeftModel.from_pretrained(_peft_base(folder, cfg), tmp_path).eval()
    with torch.no_grad():
        assert _rel(loaded(**batch).logits, model(**batch).logits) < 1e-5

    from qlora_cli.model.adapter_io import load_adapter

    again = load_base_model(cfg, CPU)  # and qlora loads it back
    load_adapter(again, tmp_path)
    with torch.no_grad():
        assert _rel(again.eval()(**batch).logits, model(**batch).logits) < 1e-6


def test_copies_with_new_tokens_train_resume_bit_exact_and_merge(tmp_path, llama_dir, monkeypatch):
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from qlora_cli.run_folder import load_adapted_model, open_run

    data = write_jsonl(tmp_path / "d.jsonl", _tool_rows(16))
    kw = dict(special_tokens=NEW, modules_to_save=BOTH, learning_rate=1e-2, max_steps=4, save_steps=2,
              micro_batch_size=4, lora_target_modules="all-linear")  # fmt: skip
    quiet = Console(quiet=True)
    straight = tmp_path / "straight"
    run_train(make_config(llama_dir, data, straight, **kw), console=quiet)
    saved = load_file(str(straight / ADAPTER_WEIGHTS))
    embed = saved["base_model.model.model.embed_tokens.weight"]
    base_rows = load_base_model(make_config(llama_dir, data, tmp_path / "x"), CPU).get_input_embeddings().weight
    assert embed.shape[0] == base_rows.shape[0] + 2  # grown for the two new tokens, trained whole
    assert (embed[: base_rows.shape[0]] - base_rows).abs().max() > 0  # old rows trained too, not only the new

    resumed = tmp_path / "resumed"
    interrupted_then_resumed(make_config(llama_dir, data, resumed, **kw), monkeypatch, quiet, at=3)
    again = load_file(str(resumed / ADAPTER_WEIGHTS))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    merged = tmp_path / "m"
    result = run_cli("merge", str(straight), "-o", str(merged), "--dtype", "float32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    adapted, tokenizer = load_adapted_model(open_run(straight), CPU)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert torch.equal(model.get_input_embeddings().weight, embed)
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert _rel(model(**batch).logits, adapted(**batch).logits) < 1e-4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"modules_to_save": ["q_proj"]}, "modules_to_save: 'q_proj' is not this model's input embedding"),
        ({"modules_to_save": ["lm_head"], "lora_target_modules": ["q_proj", "lm_head"]}, "also a LoRA target"),
        ({"modules_to_save": ["embed_tokens"], "tokens": ["<t>"]}, "list both the embedding and the output head"),
        ({"modules_to_save": ["embed_tokens"], "method": "dpo"}, "key 'modules_to_save': not with method: dpo"),
    ],
)
def test_bad_copy_settings_are_one_line_errors(tmp_path, llama_dir, extra, message):
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", _tool_rows(8))
    config = {"base_model": str(llama_dir), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o"),
              "device": "cpu", "bnb_4bit_compute_dtype": "float32", **extra}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert_user_error(run_cli("train", str(tmp_path / "c.yaml")), message)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_serve_refuses_copies_at_load_and_inspect_names_them(tmp_path, llama_dir):
    from qlora_cli.config import ModelSettings, QuantSettings
    from qlora_cli.errors import ModelError
    from qlora_cli.inspect.adapter import adapter_report
    from qlora_cli.serving.multi_lora import MultiLoRA

    data = write_jsonl(tmp_path / "d.jsonl", _tool_rows(8))
    run = tmp_path / "run"
    run_train(make_config(llama_dir, data, run, modules_to_save=["lm_head"], max_steps=1), console=None)
    multi = MultiLoRA(load_base_model(ModelSettings(str(llama_dir), quant=QuantSettings(compute_dtype="float32")), CPU))
    with pytest.raises(ModelError, match=r"trains full copies of lm_head \(modules_to_save\)"):
        multi.load("copies", run)
    report = adapter_report(run)
    assert report["adapter_kind"] == "LoRA + whole lm_head"
    assert any("modules_to_save" in p for p in report["serving"]["problems"])


def test_a_peft_copy_that_unties_a_tied_head_is_refused_not_loaded_tied(model_factory, tmp_path):
    from peft import LoraConfig, get_peft_model

    from qlora_cli.errors import ModelError
    from qlora_cli.model.adapter_io import load_adapter

    folder = model_factory("gemma2", initializer_range=0.1, layers=1, hidden=32)
    cfg = load_config(None, base_model=str(folder), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32")
    peft = get_peft_model(
        _peft_base(folder, cfg), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    peft.save_pretrained(tmp_path)  # PEFT's own default: the head's copy alone, the embedding left as it was
    with pytest.raises(ModelError, match="without PEFT's ensure_weight_tying, which unties them"):
        load_adapter(load_base_model(cfg, CPU), tmp_path)
    from qlora_cli.inspect.adapter import adapter_report

    assert adapter_report(tmp_path)["adapter_kind"] == "LoRA + whole lm_head"  # inspect still reads it
