"""Mixed-adapter batches (MultiLoRA) and the generation engine, in float32 on CPU, against qlora's normal
one-adapter path and plain transformers generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qlora_cli.config import LoRASettings, ModelSettings, QuantSettings
from qlora_cli.errors import ModelError
from qlora_cli.model.adapter_io import save_adapter, to_peft_key
from qlora_cli.model.loading import load_base_model, load_tokenizer
from qlora_cli.model.lora import inject_lora, lora_layers
from qlora_cli.run_folder import load_adapted_model, open_run
from qlora_cli.serving.engine import (
    Engine,
    Generation,
    IncrementalDecoder,
    SamplingParams,
    end_of_turn_ids,
    held_back,
    sample_next,
)
from qlora_cli.serving.multi_lora import BASE_ONLY, MultiLoRA, MultiLoRALinear
from qlora_cli.testing.tiny import build_char_tokenizer

CPU = torch.device("cpu")
FLOAT32_NF4 = QuantSettings(compute_dtype="float32")


# ---------------------------------------------------------------------------------------------
# helpers


def write_adapter(folder: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float) -> Path:
    """A PEFT-format adapter folder from {module: (A (r, in), B (out, r))}."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for module, (A, B) in weights.items():
        state[to_peft_key(f"{module}.lora_A.weight")] = A.contiguous()
        state[to_peft_key(f"{module}.lora_B.weight")] = B.contiguous()
    save_file(state, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({m.split(".")[-1] for m in weights}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def random_adapter(base_dir: Path, out: Path, r: int, targets, seed: int, quant: QuantSettings = FLOAT32_NF4) -> Path:
    """Train nothing: inject LoRA into the base, give B random values (a zero B proves nothing), save."""
    model = load_base_model(ModelSettings(str(base_dir), quant=quant), CPU)
    settings = LoRASettings(r=r, alpha=2.0 * r, dropout=0.0, target_modules=targets, use_rslora=False)
    inject_lora(model, settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)
    save_adapter(model, out, settings, str(base_dir))
    return out


def reference_ids(model, prompt_ids: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy tokens from transformers' own generate, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, use_cache=True
        )[0, len(prompt_ids) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def seqs_for(tok, prompts: list[str], slots: list[int], max_tokens: list[int]) -> list[Generation]:
    eos = frozenset([tok.eos_token_id])
    return [
        Generation(list(tok(p)["input_ids"]), tok, SamplingParams(max_tokens=m), slot, eos)
        for p, slot, m in zip(prompts, slots, max_tokens)
    ]


# ---------------------------------------------------------------------------------------------
# the layer math


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 12)
        self.down = nn.Linear(12, 8, bias=False)

    def forward(self, x):
        return self.down(self.up(x))


def test_mixed_rows_apply_each_rows_own_adapter(tmp_path):
    """y[b] = W x[b] + s·(x[b] Aᵀ) Bᵀ with row b's adapter; ranks 2 and 6 side by side; an adapter that does
    not target a layer adds nothing there; base rows are the base layer."""
    torch.manual_seed(0)
    model = TwoLayers()
    w = {
        "a": {"up": (torch.randn(2, 16) / 4, torch.randn(12, 2) / 4), "down": (torch.randn(2, 12), torch.randn(8, 2))},
        "b": {"up": (torch.randn(6, 16) / 4, torch.randn(12, 6) / 4)},  # rank 6, and no update on `down`
    }
    write_adapter(tmp_path / "a", w["a"], r=2, alpha=4.0)  # scaling 2
    write_adapter(tmp_path / "b", w["b"], r=6, alpha=3.0)  # scaling 0.5
    x_all = torch.randn(4, 3, 16)
    ref_base = model(x_all)

    def reference(name: str | None, xb: torch.Tensor) -> torch.Tensor:
        up, down = model.up, model.down
        h = up(xb)
        if name == "a":
            h = h + 2.0 * (xb @ w["a"]["up"][0].T) @ w["a"]["up"][1].T
            return down(h) + 2.0 * (h @ w["a"]["down"][0].T) @ w["a"]["down"][1].T
        if name == "b":
            h = h + 0.5 * (xb @ w["b"]["up"][0].T) @ w["b"]["up"][1].T
        return down(h)

    multi = MultiLoRA(model)
    a, b = multi.load("a", tmp_path / "a"), multi.load("b", tmp_path / "b")
    assert isinstance(model.up, MultiLoRALinear) and isinstance(model.down, MultiLoRALinear)
    assert model.up.rank == 6 and (model.down.lora_A[b.slot] == 0).all() and a.slot != b.slot
    rows = ["a", "b", None, "a"]
    for T in (3, 1):  # a prefill (gather + bmm) and a decode step (bag sums over the stacks)
        x = x_all[:, :T]
        with torch.no_grad(), multi.use_rows([multi.slot(n) for n in rows]):
            mixed = model(x)
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i], reference(name, x[i]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[0], ref_base[0, :T])  # the adapters really change the output
    for name in ("a", "b"):  # a batch for one adapter (no gather) gives the same
        with torch.no_grad(), multi.use_rows([multi.slot(name)] * 4):
            uniform = model(x_all)
        expected = torch.stack([reference(name, x_all[i]) for i in range(4)])
        torch.testing.assert_close(uniform, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x_all), ref_base)  # outside use_rows: the base alone


# ---------------------------------------------------------------------------------------------
# whole models: a mixed batch == each adapter alone


@pytest.fixture(scope="module")
def adapters(model_factory, tmp_path_factory):
    """Three random adapters of different ranks and targets on a tiny llama, and two on a tiny GPT-2 (Conv1D)."""
    tmp = tmp_path_factory.mktemp("adapters")
    llama = model_factory("llama", initializer_range=0.1)
    gpt2 = model_factory("gpt2", initializer_range=0.1)
    return {
        "llama": (
            llama,
            {
                "qv4": random_adapter(llama, tmp / "qv4", 4, ["q_proj", "v_proj"], seed=1),
                "all8": random_adapter(llama, tmp / "all8", 8, "all-linear", seed=2),
                "down2": random_adapter(llama, tmp / "down2", 2, ["down_proj"], seed=3),
            },
        ),
        "gpt2": (
            gpt2,
            {
                "attn4": random_adapter(gpt2, tmp / "attn4", 4, ["c_attn"], seed=4),
                "all2": random_adapter(gpt2, tmp / "all2", 2, "all-linear", seed=5),
            },
        ),
    }


PROMPTS = ["hello world", "a", "the quick brown fox", "xyz abc", "mnop", "ok then", "qrs"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_equals_each_adapter_alone(adapters, arch):
    """Done-when: one batch whose rows use different adapters (ranks 2-8, different targets) and none gives
    exactly the greedy tokens of each adapter loaded alone through qlora's normal path, and base rows give
    the base model's tokens; with rows joining and leaving the running batch (max_batch_size 3)."""
    base_dir, folders = adapters[arch]
    names = list(folders)
    who = [names[i % len(names)] if i % 3 != 2 else None for i in range(len(PROMPTS))]
    max_new = [12, 5, 9, 12, 3, 8, 12]
    settings = ModelSettings(str(base_dir), quant=FLOAT32_NF4)
    tok = load_tokenizer(settings)
    eos = tok.eos_token_id

    expected = {}
    for name in [*names, None]:
        if name is None:
            model = load_base_model(settings, CPU)
        else:
            model, _ = load_adapted_model(open_run(folders[name]), CPU, model=settings)
        for i, (p, w) in enumerate(zip(PROMPTS, who)):
            if w == name:
                expected[i] = reference_ids(model, list(tok(p)["input_ids"]), max_new[i], eos)

    base = load_base_model(settings, CPU)
    multi = MultiLoRA(base)
    for name in names:
        multi.load(name, folders[name])
    seqs = seqs_for(tok, PROMPTS, [multi.slot(w) for w in who], max_new)
    engine = Engine(base, multi, max_batch_size=3)
    engine.run(seqs)
    for i, seq in enumerate(seqs):
        assert seq.output_ids == expected[i], (i, who[i])
        assert seq.text == tok.decode(expected[i], skip_special_tokens=True)
    # the adapters matter: the same prompt gives different tokens under different adapters
    probe = seqs_for(tok, ["hello world"] * (len(names) + 1), [*(multi.slot(n) for n in names), BASE_ONLY], [12] * 4)
    engine.run(probe)
    assert len({tuple(s.output_ids) for s in probe}) == len(probe)


def test_adapter_that_does_not_fit_is_refused_and_changes_nothing(adapters, model_factory, tmp_path):
    base_dir, folders = adapters["llama"]
    settings = ModelSettings(str(base_dir), quant=FLOAT32_NF4)
    tok = load_tokenizer(settings)
    base = load_base_model(settings, CPU)
    multi = MultiLoRA(base)
    multi.load("qv4", folders["qv4"])
    engine = Engine(base, multi)
    before = engine.run(seqs_for(tok, ["hello world"], [multi.slot("qv4")], [10]))[0].output_ids

    wider = model_factory("llama", hidden=32, initializer_range=0.1)  # same module names, other shapes
    other = random_adapter(wider, tmp_path / "wider", 4, ["q_proj", "v_proj"], seed=9)
    with pytest.raises(ModelError, match=r"does not fit the base model: model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        multi.load("wider", other)
    gpt2_adapter = adapters["gpt2"][1]["attn4"]
    with pytest.raises(ModelError, match="no linear module named 'transformer.h.0.attn.c_attn'"):
        multi.load("gpt2", gpt2_adapter)
    with pytest.raises(ModelError, match="already loaded"):
        multi.load("qv4", folders["all8"])
    with pytest.raises(ModelError, match="not found"):
        multi.load("missing", tmp_path / "nope")
    assert list(multi.adapters) == ["qv4"] and multi.capacity == 1
    after = engine.run(seqs_for(tok, ["hello world"], [multi.slot("qv4")], [10]))[0].output_ids
    assert after == before


def test_unload_frees_the_slot_for_the_next_adapter(adapters):
    base_dir, folders = adapters["llama"]
    settings = ModelSettings(str(base_dir), quant=FLOAT32_NF4)
    tok = load_tokenizer(settings)
    base = load_base_model(settings, CPU)
    multi = MultiLoRA(base)
    engine = Engine(base, multi)

    def answer(name: str) -> list[int]:
        return engine.run(seqs_for(tok, ["the quick brown fox"], [multi.slot(name)], [10]))[0].output_ids

    multi.load("all8", folders["all8"])
    multi.load("qv4", folders["qv4"])
    all8, qv4 = answer("all8"), answer("qv4")
    slot = multi.pin("all8")  # a request running on it
    multi.unload("all8")
    with pytest.raises(ModelError, match="no adapter named 'all8'"):
        multi.pin("all8")
    assert slot in multi.retired and not multi.free  # still pinned: kept
    multi.unpin(slot)
    assert multi.free == [slot] and float(multi.layers["model.layers.0.mlp.up_proj"].lora_A[slot].abs().sum()) == 0
    multi.load("down2", folders["down2"])
    assert multi.slot("down2") == slot and multi.capacity == 2  # reused, not grown
    assert answer("qv4") == qv4
    multi.load("all8-again", folders["all8"])
    assert answer("all8-again") == all8


def test_engine_matches_transformers_generate_across_architectures(model_factory):
    """Left padding, position ids and the KV cache (joined across requests where the cache allows it) give
    transformers' greedy tokens for each prompt alone; gemma2's sliding-window cache runs without joins."""
    for arch in ("opt", "gemma2"):
        settings = ModelSettings(str(model_factory(arch, initializer_range=0.1)), quant=FLOAT32_NF4)
        tok = load_tokenizer(settings)
        model = load_base_model(settings, CPU)
        max_new = [10, 4, 7, 10, 2]
        expected = [
            reference_ids(model, list(tok(p)["input_ids"]), m, tok.eos_token_id) for p, m in zip(PROMPTS, max_new)
        ]
        seqs = seqs_for(tok, PROMPTS[:5], [BASE_ONLY] * 5, max_new)
        Engine(model, None, max_batch_size=2).run(seqs)
        assert [s.output_ids for s in seqs] == expected, arch


# ---------------------------------------------------------------------------------------------
# text: incremental decoding, stop strings, sampling


def byte_level_tokenizer():
    """One token per byte (GPT-2 style byte-level BPE without merges): multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_incremental_decoding_never_splits_a_character():
    tok = byte_level_tokenizer()
    text = "héllo → 世界 🙂!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    start = len(text[: text.index("🙂")].encode())  # the emoji's 4 bytes: nothing until the last one
    assert deltas[start : start + 4] == ["", "", "", "🙂"]


def test_stop_strings_end_the_text_and_are_held_back_while_undecided():
    tok = build_char_tokenizer()
    released: list[str] = []
    seq = Generation(
        [1], tok, SamplingParams(max_tokens=50, stop=["END", "##"]), on_text=lambda s, d: released.append(d)
    )
    for ch in "abcENxyz#aEN":
        seq.append(tok.convert_tokens_to_ids(ch))
    assert seq.text == "abcENxyz#a" and not seq.finished  # "EN" could still become "END": held back
    for ch in "D and more":
        seq.append(tok.convert_tokens_to_ids(ch))
        if seq.finished:
            break
    assert seq.finish_reason == "stop" and seq.text == "abcENxyz#a" and "".join(released) == seq.text
    assert held_back("xxEN", ["END"]) == 2 and held_back("xx", ["END"]) == 0 and held_back("#", ["##", "#!"]) == 1

    eos = Generation([1], tok, SamplingParams(max_tokens=3), eos_ids=frozenset([tok.eos_token_id]))
    eos.append(tok.convert_tokens_to_ids("a"))
    eos.append(tok.eos_token_id)
    assert eos.finish_reason == "stop" and eos.text == "a" and eos.output_ids[-1] == tok.eos_token_id
    length = Generation([1], tok, SamplingParams(max_tokens=2))
    for ch in "abc":
        if not length.finished:
            length.append(tok.convert_tokens_to_ids(ch))
    assert length.finish_reason == "length" and length.text == "ab"


def test_sampling_temperature_top_p_and_seed():
    tok = build_char_tokenizer()
    logits = torch.full((1, 8), -1e9)
    logits[0, 3], logits[0, 5] = 0.0, float(torch.log(torch.tensor(3.0)))  # p = 0.25, 0.75

    def draws(params: SamplingParams, n: int) -> list[int]:
        seq = Generation([1], tok, params)
        return [sample_next(logits, [seq])[0] for _ in range(n)]

    assert set(draws(SamplingParams(temperature=0.0), 5)) == {5}  # greedy
    free = draws(SamplingParams(temperature=1.0, seed=0), 2000)
    assert set(free) == {3, 5} and abs(free.count(3) / 2000 - 0.25) < 0.04
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0), 200)) == {5}  # 0.75 >= 0.7: top only
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8, seed=0), 200)) == {3, 5}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.0, seed=0), 20)) == {5}
    assert draws(SamplingParams(temperature=1.0, seed=7), 50) == draws(SamplingParams(temperature=1.0, seed=7), 50)
    assert draws(SamplingParams(temperature=1.0, seed=7), 50) != draws(SamplingParams(temperature=1.0, seed=8), 50)


def test_chat_end_of_turn_token_is_found_from_the_template():
    tok = build_char_tokenizer()  # chatml: an assistant turn ends with <|im_end|>
    assert end_of_turn_ids(tok) == {tok.convert_tokens_to_ids("<|im_end|>")}
    assert end_of_turn_ids(build_char_tokenizer(chat_template=None)) == frozenset()


def test_padding_shrinks_when_the_largest_adapter_is_unloaded(tmp_path):
    """Ranks 2 and 6 pad every slot to 6; once the rank-6 adapter is gone (and no request pins it) the stacks
    are rank 2 again and the rank-2 adapter's output is unchanged."""
    torch.manual_seed(0)
    model = TwoLayers()
    write_adapter(tmp_path / "a", {"up": (torch.randn(2, 16), torch.randn(12, 2))}, r=2, alpha=2.0)
    write_adapter(tmp_path / "b", {"up": (torch.randn(6, 16), torch.randn(12, 6))}, r=6, alpha=6.0)
    multi = MultiLoRA(model)
    a = multi.load("a", tmp_path / "a")
    multi.load("b", tmp_path / "b")
    x = torch.randn(2, 3, 16)
    with multi.use_rows([a.slot, BASE_ONLY]):
        before = model(x)
    assert model.up.rank == 6
    slot = multi.pin("b")
    multi.unload("b")
    assert model.up.rank == 6  # still pinned by a running request
    multi.unpin(slot)
    assert model.up.rank == 2 and model.up.lora_A.shape == (2, 16, 2)
    with multi.use_rows([a.slot, BASE_ONLY]):
        torch.testing.assert_close(model(x), before)
