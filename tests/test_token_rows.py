"""New tokens and trained embedding rows (``tokens``, ``special_tokens``, ``trainable_token_indices``): equal to
PEFT's trainable tokens on the same 4-bit base, saved in its format, and through qlora's pipeline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_cli.config import ModelSettings, load_config
from qlora_cli.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora_cli.model.adapter_io import save_adapter
from qlora_cli.model.loading import DTYPES, bnb_config, disable_cpu_weight_repacking, load_base_model, load_tokenizer
from qlora_cli.model.lora import inject_lora, lora_disabled, lora_layers
from qlora_cli.model.token_rows import ROWS_KEY, resize_for, row_modules, token_ids, train_rows
from qlora_cli.train.loop import run_train
from tests.conftest import interrupted_then_resumed, make_config, write_jsonl
from tests.test_cli import assert_user_error, run_cli

CPU = torch.device("cpu")
TOL = 1e-5
NEW = ["<tool>", "</tool>"]


pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def _rel(a, b) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


def _cfg(folder, **kw):
    return load_config(
        None, base_model=str(folder), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32", lora_r=4,
        lora_alpha=8, lora_dropout=0.0, special_tokens=NEW, **kw,
    )  # fmt: skip


def _ours(folder):
    cfg = _cfg(folder)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_base_model(cfg, CPU)
    before = model.get_input_embeddings().num_embeddings
    resize_for(model, len(tokenizer))
    inject_lora(model, cfg.lora)
    ids = token_ids(tokenizer, cfg.added_tokens)
    spec = train_rows(model, ids, set(ids), before)
    return cfg, tokenizer, model, spec


def _batch(tokenizer):
    text = ["a <tool>b</tool> c", "<tool>xy</tool>"]
    enc = tokenizer(text, padding=True, return_tensors="pt")
    return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # an untied head (its rows trained too) and a tied one
def test_rows_equal_peft_trainable_tokens_on_the_same_4bit_base(model_factory, arch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = model_factory(arch, initializer_range=0.1, layers=1, hidden=32)
    cfg, tokenizer, model, spec = _ours(folder)
    ids = token_ids(tokenizer, NEW)
    assert ids == [len(tokenizer) - 2, len(tokenizer) - 1]
    tied = arch == "gemma2"
    assert list(spec) == (["embed_tokens"] if tied else ["embed_tokens", "lm_head"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained rows and adapter: every term counts
        for _, m in row_modules(model):
            m.rows.copy_(torch.randn(m.rows.shape, generator=g) * 0.1)
        for _, m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)

    base = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config(cfg.quant), dtype=DTYPES["float32"], device_map={"": "cpu"}
    )
    base.config.use_cache = False
    disable_cpu_weight_repacking(base)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                           trainable_token_indices=spec))  # fmt: skip
    modules = dict(peft.base_model.model.named_modules())
    with torch.no_grad():
        for name, m in lora_layers(model):
            modules[name].lora_A["default"].weight.copy_(m.lora_A.weight)
            modules[name].lora_B["default"].weight.copy_(m.lora_B.weight)
        for name, m in row_modules(model):
            adapter = modules[name].token_adapter if hasattr(modules[name], "token_adapter") else modules[name]
            adapter.trainable_tokens_delta["default"].copy_(m.rows)
    batch = _batch(tokenizer)
    model.train(), peft.train()
    ours, theirs = model(**batch), peft(**batch)
    assert _rel(ours.logits, theirs.logits) < TOL
    ours.loss.backward()
    theirs.loss.backward()
    for name, m in row_modules(model):
        if tied and "lm_head" in name:
            continue
        peft_rows = modules[name].token_adapter.trainable_tokens_delta["default"]
        assert m.rows.grad.norm() > 0
        assert _rel(m.rows.grad, peft_rows.grad) < 1e-4, name
    with lora_disabled(model), torch.no_grad():  # the base alone: rows off too
        plain = model(**batch).logits
    assert _rel(plain, ours.logits) > 1e-3


def test_fresh_rows_start_at_the_mean_row_and_peft_loads_the_folder(llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, tokenizer, model, spec = _ours(llama_dir)
    embed = model.get_input_embeddings()
    old = embed.base.weight[: len(tokenizer) - 2].float().mean(0)
    assert torch.allclose(embed.rows[0], old) and torch.allclose(embed.rows[1], old)
    with torch.no_grad():
        for _, m in row_modules(model):
            m.rows.add_(0.3)
    model.eval()
    save_adapter(model, tmp_path, cfg.lora, str(llama_dir))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    ids = token_ids(tokenizer, NEW)
    assert config["trainable_token_indices"] == {"embed_tokens": ids, "lm_head": ids}
    keys = load_file(str(tmp_path / ADAPTER_WEIGHTS)).keys()
    assert f"base_model.model.model.embed_tokens{ROWS_KEY}" in keys and f"base_model.model.lm_head{ROWS_KEY}" in keys
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=bnb_config(cfg.quant), dtype=torch.float32, device_map={"": "cpu"}
    )
    disable_cpu_weight_repacking(base)
    base.resize_token_embeddings(len(tokenizer))
    peft = PeftModel.from_pretrained(base, tmp_path).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert _rel(model(**batch).logits, peft(**batch).logits) < TOL


def _tool_rows(n: int) -> list[dict]:
    return [{"prompt": f"call {w}: ", "completion": f"<tool>{w}</tool>"} for w in ["ab", "cd", "ef", "gh"] * (n // 4)]


def test_new_tokens_train_resume_bit_exact_and_evaluate(tmp_path, llama_dir, monkeypatch):
    from rich.console import Console

    data = write_jsonl(tmp_path / "d.jsonl", _tool_rows(32))
    kw = dict(special_tokens=NEW, learning_rate=1e-2, max_steps=6, save_steps=3, micro_batch_size=4,
              val_set_size=0.25)  # fmt: skip
    quiet = Console(quiet=True)
    straight = tmp_path / "straight"
    run_train(make_config(llama_dir, data, straight, **kw), console=quiet)
    saved = load_file(str(straight / ADAPTER_WEIGHTS))
    rows = saved[f"base_model.model.model.embed_tokens{ROWS_KEY}"]
    assert rows.shape == (2, 64) and not torch.allclose(rows[0], rows[1])  # both moved from the same mean start
    tokenizer = load_tokenizer(ModelSettings(base_model=str(llama_dir), tokenizer=str(straight)))
    assert tokenizer.convert_tokens_to_ids("<tool>") == len(tokenizer) - 2  # the run's tokenizer has them

    resumed = tmp_path / "resumed"
    interrupted_then_resumed(make_config(llama_dir, data, resumed, **kw), monkeypatch, quiet)
    again = load_file(str(resumed / ADAPTER_WEIGHTS))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    out = tmp_path / "eval.json"
    res = run_cli("eval", str(straight), "--device", "cpu", "--json", str(out), "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    base, tuned = json.loads(out.read_text())["models"]
    assert tuned["loss"] < base["loss"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"special_tokens": {"sep_token": "<s>"}}, "'sep_token' is not a token role"),
        ({"tokens": [""]}, "a token must not be empty"),
        ({"trainable_token_indices": [-1]}, "token ids are >= 0"),
        ({"trainable_token_indices": [10**6]}, "1000000 is not a token id of this model"),
        ({"lora_modules_to_save": ["embed_tokens"]}, "tokens / special_tokens"),
        ({"tokens": ["<t>"], "lora_target_modules": ["q_proj", "lm_head"]}, "the output head is a LoRA target"),
    ],
)
def test_bad_token_settings_are_one_line_errors(tmp_path, llama_dir, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", _tool_rows(8))
    config = {"base_model": str(llama_dir), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o"),
              "device": "cpu", "bnb_4bit_compute_dtype": "float32", **extra}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    res = run_cli("train", str(tmp_path / "c.yaml"))
    assert_user_error(res, message)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # an untied head (its rows grown and replaced) and a tied one
def test_merge_and_export_take_new_tokens_and_gguf_lora_and_serve_refuse_them(tmp_path, arch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qlora_cli.config import QuantSettings
    from qlora_cli.errors import ModelError
    from qlora_cli.inspect.adapter import adapter_report
    from qlora_cli.run_folder import load_adapted_model, open_run
    from qlora_cli.serving.multi_lora import MultiLoRA
    from qlora_cli.testing.tiny import build_bpe_tokenizer, build_tiny_model

    extra = {"query_pre_attn_scalar": 16} if arch == "gemma2" else {}  # llama.cpp scales gemma2 by head_dim
    base_dir = build_tiny_model(tmp_path / "base", arch, tokenizer=build_bpe_tokenizer("llama3"), **extra)
    data = write_jsonl(tmp_path / "d.jsonl", _tool_rows(8))
    run = tmp_path / "run"
    # every linear layer a target: the merged model then holds exactly the NF4 weights the adapter ran on
    cfg = make_config(
        base_dir, data, run, tokens=NEW, max_steps=2, learning_rate=1e-2, lora_target_modules="all-linear"
    )
    run_train(cfg, console=None)
    merged = tmp_path / "m"
    result = run_cli("merge", str(run), "-o", str(merged), "--dtype", "float32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    adapted, tokenizer = load_adapted_model(open_run(run), CPU)
    size = len(tokenizer)
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == size
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = token_ids(tokenizer, NEW)
    rows = load_file(str(run / ADAPTER_WEIGHTS))[f"base_model.model.model.embed_tokens{ROWS_KEY}"]
    assert model.get_input_embeddings().weight.shape[0] == size
    assert torch.equal(model.get_input_embeddings().weight[ids], rows)  # the trained rows, in float32 as saved
    batch = _batch(tokenizer)
    with torch.no_grad():  # the merged model computes what the adapter on its base computes
        assert _rel(model(**batch).logits, adapted(**batch).logits) < 1e-4
    with safe_open(str(next(merged.glob("*.safetensors"))), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (arch == "llama")  # a tied model stays tied

    result = run_cli("export", str(run), "-o", str(tmp_path / "x.gguf"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    import gguf

    reader = gguf.GGUFReader(tmp_path / "x.gguf")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    embd = torch.from_numpy(gguf.dequantize(embd.data, embd.tensor_type).reshape(list(reversed(embd.shape))).copy())
    assert embd.shape[0] == size and _rel(embd[ids].float(), rows) < 0.02  # q8_0 of the trained rows
    field = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(field.parts[i]).decode() for i in field.data]
    assert [vocab[i] for i in ids] == NEW and len(vocab) == size
    result = run_cli("export", str(run), "-o", str(tmp_path / "l.gguf"), "--format", "gguf-lora")
    assert_user_error(result, "a llama.cpp LoRA file cannot change the base's vocabulary")
    assert not (tmp_path / "l.gguf").exists()
    multi = MultiLoRA(load_base_model(ModelSettings(str(base_dir), quant=QuantSettings(compute_dtype="float32")), CPU))
    with pytest.raises(ModelError, match="which qlora serve does not take yet"):
        multi.load("rows", run)
    report = adapter_report(run)
    assert report["adapter_kind"] == "LoRA + trained token rows"
    assert any("trainable_token_indices" in p for p in report["serving"]["problems"])


def test_qlora_loads_a_peft_trainable_tokens_adapter_with_the_same_logits(llama_dir, tmp_path):
    """PEFT's list form names the input embedding only: an untied head keeps its base rows on both sides."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_cli.model.adapter_io import load_adapter

    cfg = _cfg(llama_dir)
    tokenizer = load_tokenizer(cfg)
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=bnb_config(cfg.quant), dtype=torch.float32, device_map={"": "cpu"}
    )
    disable_cpu_weight_repacking(base)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = token_ids(tokenizer, NEW)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=ids))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.2)
    peft.save_pretrained(tmp_path, save_embedding_layers=False)  # the rows only, as qlora writes them
    model = load_base_model(cfg, CPU)
    load_adapter(model, tmp_path)
    assert [n for n, _ in row_modules(model)] == ["model.embed_tokens"]
    batch = _batch(tokenizer)
    # PEFT's resize drew the new head rows at random; qlora's resize writes the mean row: compare on the same head
    model.get_output_embeddings().weight.data.copy_(peft.base_model.model.lm_head.weight.data)
    peft.eval(), model.eval()
    with torch.no_grad():
        assert _rel(model(**batch).logits, peft(**batch).logits) < TOL


def test_a_role_given_to_a_token_the_tokenizer_has_trains_no_row(tmp_path, llama_dir):
    """Axolotl's special_tokens: {pad_token: <eos>} sets a role; it must not train EOS's row. A new role token does."""
    data = write_jsonl(tmp_path / "d.jsonl", _tool_rows(8))
    tok = load_tokenizer(ModelSettings(base_model=str(llama_dir)))
    run = tmp_path / "run"
    run_train(make_config(llama_dir, data, run, special_tokens={"pad_token": tok.eos_token}, max_steps=1), console=None)
    assert not any(k.endswith(ROWS_KEY) for k in load_file(str(run / ADAPTER_WEIGHTS)))
    assert "trainable_token_indices" not in json.loads((run / ADAPTER_CONFIG).read_text())
    res = run_cli("eval", str(run), "--device", "cpu", "--data", str(data), "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    run2 = tmp_path / "run2"
    run_train(make_config(llama_dir, data, run2, special_tokens={"pad_token": "<|pad|>"}, max_steps=1), console=None)
    config = json.loads((run2 / ADAPTER_CONFIG).read_text())
    assert config["trainable_token_indices"]["embed_tokens"] == [len(tok)]  # the one new token
