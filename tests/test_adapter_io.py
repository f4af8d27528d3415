from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file

from qlora_cli.config import LoRASettings, load_config
from qlora_cli.errors import ModelError
from qlora_cli.model.adapter_io import from_peft_key, load_adapter, read_adapter, save_adapter, to_peft_key
from qlora_cli.model.loading import load_base_model
from qlora_cli.model.lora import inject_lora, lora_layers


def base_config(folder, four_bit: bool):
    return load_config(
        None,
        base_model=str(folder),
        datasets=[{"path": "x.jsonl"}],
        load_in_4bit=four_bit,
        bnb_4bit_compute_dtype="float32",
    )


def adapted_model(folder, four_bit: bool, targets, seed: int = 0, **lora_kw):
    """A base with LoRA whose B is random (a zero B would make every comparison trivially pass)."""
    model = load_base_model(base_config(folder, four_bit), torch.device("cpu"))
    settings = LoRASettings(
        r=lora_kw.get("r", 4),
        alpha=lora_kw.get("alpha", 8.0),
        dropout=0.1,
        target_modules=targets,
        use_rslora=lora_kw.get("rslora", False),
    )
    torch.manual_seed(seed)
    inject_lora(model, settings)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.weight.normal_(0, 0.2)
    model.eval()
    return model, settings


def test_key_mapping_round_trip():
    key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert to_peft_key(key) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert from_peft_key(to_peft_key(key)) == key
    assert from_peft_key("base_model.model.x.q_proj.lora_B.default.weight") == "x.q_proj.lora_B.weight"
    with pytest.raises(ModelError, match="not a PEFT LoRA adapter"):
        from_peft_key("model.x.lora_A.weight")


def test_saved_file_layout(tmp_path, model_factory):
    model, settings = adapted_model(model_factory("llama"), True, "all-linear")
    save_adapter(model, tmp_path, settings, "some/base")
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert len(state) == 2 * 14
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert all(t.dtype == torch.float32 for t in state.values())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"], config["use_rslora"]) == (4, 8.0, "none", False)
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert config["base_model_name_or_path"] == "some/base"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("four_bit", [False, True])
def test_save_then_load_gives_the_same_logits(tmp_path, model_factory, four_bit):
    folder = model_factory("llama")
    model, settings = adapted_model(folder, four_bit, ["q_proj", "v_proj", "down_proj"])
    save_adapter(model, tmp_path, settings, str(folder))
    fresh = load_base_model(base_config(folder, four_bit), torch.device("cpu"))
    names = load_adapter(fresh, tmp_path)
    assert len(names) == 6
    ids = torch.randint(6, 90, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.oldest
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox"])
@pytest.mark.parametrize("four_bit", [False, True])
def test_peft_loads_our_adapter_and_agrees(tmp_path, model_factory, arch, four_bit, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = model_factory(arch)
    model, settings = adapted_model(folder, four_bit, "all-linear", rslora=True)
    save_adapter(model, tmp_path, settings, str(folder))
    kwargs = {"dtype": torch.float32}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    reference_base = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(reference_base, tmp_path)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    peft_model.eval()
    ids = torch.randint(6, 90, (2, 12))
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter really changes the output
    atol = 1e-4 if not four_bit else 1e-2  # NF4: bf16-level tolerance (identical kernels give ~0 here)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


def test_adapter_that_does_not_fit_the_base(tmp_path, model_factory):
    small = model_factory("llama")
    wide = model_factory("llama", hidden=96)
    model, settings = adapted_model(small, False, ["q_proj"])
    save_adapter(model, tmp_path, settings, str(small))
    with pytest.raises(ModelError, match="has shape"):
        load_adapter(load_base_model(base_config(wide, False), torch.device("cpu")), tmp_path)
    with pytest.raises(ModelError, match="does not fit the base model"):
        load_adapter(load_base_model(base_config(model_factory("gpt2"), False), torch.device("cpu")), tmp_path)


def test_adapter_folder_errors(tmp_path):
    with pytest.raises(ModelError, match="adapter folder not found"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="missing adapter_model.safetensors"):
        read_adapter(tmp_path)
