"""qlora export: GGUF files that transformers' own GGUF loader (an independent reader) reads back with the
merged model's logits and the run's token ids, for every supported family; the GGUF LoRA adds up to the
merged weights; the self-check catches a wrong layout; bad input is refused with nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.export import gguf_arch as arch_mod
from qlora_cli.export import run_export
from qlora_cli.export.check import load_gguf_model
from qlora_cli.export.ollama import modelfile_path, modelfile_text
from qlora_cli.testing.tiny import build_bpe_tokenizer, build_tiny_model

from .conftest import upper_rows, write_jsonl
from .test_merge import _one_thread, make_run, quiet_merge  # noqa: F401  (_one_thread: autouse, one torch thread)

gguf = pytest.importorskip("gguf")
CPU = torch.device("cpu")
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("export-data") / "d.jsonl", upper_rows(8, 0))


def family_run(
    root: Path, arch: str, kind: str, data: Path, b_std: float = 0.05, init: dict | None = None, **kw
) -> Path:
    """A tiny ``arch`` model with a trained-style ``kind`` tokenizer and a random adapter on every linear layer."""
    tok = build_bpe_tokenizer(kind)
    extra = {"query_pre_attn_scalar": 16} if arch == "gemma2" else {}  # llama.cpp scales gemma2 by head_dim
    init = init or {}
    base = build_tiny_model(root / "base", arch, tokenizer=tok, **extra, **init)
    kw.setdefault("load_in_4bit", False)
    return make_run(base, root / "run", data, b_std=b_std, lora_target_modules="all-linear", **kw)


def read_gguf(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape))) for t in reader.tensors}


def field(path: Path, key: str):
    from qlora_cli.model.gguf import field_value

    f = gguf.GGUFReader(path).fields.get(key)
    return None if f is None else field_value(f)


@torch.no_grad()
def logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 12345",
    "Schön, 東京 🙂 and tabs\tand  two spaces",
]


@pytest.mark.parametrize(
    "arch,kind,quant,max_diff",
    [
        ("llama", "llama3", "f32", 1e-4),  # rotary rows permuted for llama.cpp and back by the reader
        ("mistral", "sentencepiece", "f16", 0.05),  # mistral runs as llama.cpp's llama
        ("qwen2", "qwen2", "q8_0", 0.1),  # q/k/v biases, no BOS
        ("gemma2", "gemma", "bf16", 0.1),  # norms + 1, tied head, softcapping
        ("phi3", "sentencepiece", "q4_0", 0.5),  # fused qkv and gate_up
    ],
)
def test_round_trip_through_transformers_gguf_loader(tmp_path, data, arch, kind, quant, max_diff):
    run = family_run(tmp_path, arch, kind, data)
    out = tmp_path / f"model.{quant}.gguf"
    result = run_export(run, out, quant=quant, device="cpu", console=QUIET)
    assert result.check is not None and result.check.passed, result.check.problems
    assert result.check.adapter_kl > 3 * result.check.mean_kl  # the adapter shows through the quantization

    # the merged model (qlora merge, float32) and the file as transformers reads it give the same logits
    merged = quiet_merge(run, tmp_path / "merged", dtype="float32")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(merged.output, dtype=torch.float32).eval()
    theirs = load_gguf_model(out, CPU).eval()
    assert theirs.config.model_type in (arch, "llama")
    tok = AutoTokenizer.from_pretrained(merged.output)
    file_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert file_tok(text)["input_ids"] == ids, text
        a, b = logits(ours, ids), logits(theirs, ids)
        diff = (a - b).abs().max().item()
        assert diff < max_diff, (text, diff)
    # special tokens, ids and the chat template travel with the file
    assert field(out, "tokenizer.chat_template") == tok.chat_template
    assert field(out, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.unk_token_id and file_tok.convert_tokens_to_ids("<|im_end|>") == im_end
    types = gguf.GGUFReader(out).tensors
    norm = next(t for t in types if t.name == "output_norm.weight")
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # 1-D tensors stay f32, as llama.cpp keeps them
    modelfile = modelfile_path(out, quant)
    assert modelfile.name == "model.Modelfile" and f"FROM ./{out.name}" in modelfile.read_text()


@pytest.mark.oldest
def test_4bit_run_exports_the_weights_it_trained_on(tmp_path, data):
    """The default base weights are the dequantized NF4 ones training saw: the file equals qlora merge's."""
    run = family_run(tmp_path, "llama", "llama3", data, load_in_4bit=True)
    out = tmp_path / "m.gguf"
    result = run_export(run, out, quant="f32", device="cpu", console=QUIET)
    assert result.check.passed, result.check.problems
    merged = quiet_merge(run, tmp_path / "merged", dtype="float32")
    from safetensors.torch import load_file

    weights = {}
    for shard in merged.output.glob("*.safetensors"):
        weights.update(load_file(shard))
    tensors = read_gguf(out)
    spec = arch_mod.arch_spec({**_config(merged.output)})
    q = arch_mod.permute_rotary(weights["model.layers.1.self_attn.q_proj.weight"].numpy(), spec.n_heads)
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], q)
    np.testing.assert_array_equal(
        tensors["blk.0.ffn_down.weight"], weights["model.layers.0.mlp.down_proj.weight"].numpy()
    )


def _config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


@pytest.mark.oldest
def test_gguf_lora_adds_up_to_the_merged_weights(tmp_path, data):
    """base.gguf + alpha/r · B @ A (llama.cpp's LoRA rule) == the merged file, tensor by tensor, with the
    rotary permutation applied to B."""
    run = family_run(tmp_path / "a", "llama", "llama3", data)
    zero = family_run(tmp_path / "z", "llama", "llama3", data, b_std=0.0)  # same base (same seed), no change
    merged, base, lora = tmp_path / "merged.gguf", tmp_path / "base.gguf", tmp_path / "lora.gguf"
    run_export(run, merged, quant="f32", base_weights="original", verify=False, device="cpu", console=QUIET)
    run_export(zero, base, quant="f32", base_weights="original", verify=False, device="cpu", console=QUIET)
    result = run_export(run, lora, fmt="gguf-lora", device="cpu", console=QUIET)
    assert result.format == "gguf-lora" and result.types == {"F32": 28}
    half = run_export(run, tmp_path / "lora16.gguf", fmt="gguf-lora", quant="f16", device="cpu", console=QUIET)
    assert half.types == {"F16": 28} and half.nbytes < 0.6 * result.nbytes
    assert field(lora, "general.type") == "adapter" and field(lora, "adapter.type") == "lora"
    alpha = field(lora, "adapter.lora.alpha")
    m, b, t = read_gguf(merged), read_gguf(base), read_gguf(lora)
    pairs = sorted(n[: -len(".lora_a")] for n in t if n.endswith(".lora_a"))
    assert len(pairs) == 2 * 7  # every linear layer of both blocks
    for name in pairs:
        A, B = t[f"{name}.lora_a"], t[f"{name}.lora_b"]
        rebuilt = b[name] + alpha / A.shape[0] * (B @ A)
        np.testing.assert_allclose(rebuilt, m[name], atol=1e-6, err_msg=name)
    assert not np.allclose(m["blk.0.attn_q.weight"], b["blk.0.attn_q.weight"], atol=1e-3)  # the adapter matters


def test_self_check_catches_a_wrong_layout_and_leaves_nothing(tmp_path, data, monkeypatch):
    """An export that forgets llama.cpp's rotary permutation loads fine and computes something else: the
    self-check must fail it (exit 1) and remove the file."""
    # weights large enough that attention is not near-uniform, so scrambling q/k rows changes the output
    run = family_run(tmp_path, "llama", "llama3", data, init={"initializer_range": 0.2})
    monkeypatch.setattr(arch_mod, "permute_rotary", lambda w, heads: w)
    out = tmp_path / "bad.gguf"
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(out), "--quant", "f32", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "self-check" in result.output and "FAILED" in result.output
    assert not out.exists() and not list(tmp_path.glob(".bad*")) and not (tmp_path / "bad.Modelfile").exists()


def run_cli(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def assert_refused(result, fragment: str, folder: Path, before: set[Path]) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert set(folder.iterdir()) == before  # nothing written


def test_bad_input_is_refused_before_anything_is_written(tmp_path, data):
    run = family_run(tmp_path / "llama", "llama", "llama3", data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = set(out_dir.iterdir())
    out = str(out_dir / "m.gguf")
    assert_refused(
        run_cli(str(run), "-o", out, "--quant", "q3_k"), "--quant for --format gguf must be one of", out_dir, before
    )
    lora_quant = run_cli(str(run), "-o", out, "--format", "gguf-lora", "--quant", "q8_0")
    assert_refused(lora_quant, "--quant for --format gguf-lora must be one of f32, f16", out_dir, before)
    assert_refused(run_cli(str(run), "-o", out, "--format", "onnx"), "--format must be one of", out_dir, before)
    assert_refused(run_cli(str(tmp_path / "nope"), "-o", out), "nope", out_dir, before)
    # an architecture llama.cpp's layout is not written for
    gpt2 = build_tiny_model(tmp_path / "gpt2", "gpt2", tokenizer=build_bpe_tokenizer("llama3"))
    gpt2_run = make_run(gpt2, tmp_path / "gpt2-run", data, load_in_4bit=False, lora_target_modules="all-linear")
    assert_refused(run_cli(str(gpt2_run), "-o", out), "llama, mistral, qwen2, gemma2, phi3", out_dir, before)
    # a tokenizer llama.cpp cannot reproduce (one token per character, WordLevel)
    char = build_tiny_model(tmp_path / "char", "llama")
    char_run = make_run(char, tmp_path / "char-run", data, load_in_4bit=False)
    assert_refused(run_cli(str(char_run), "-o", out), "WordLevel", out_dir, before)
    # an existing output is kept unless --force
    (out_dir / "m.gguf").write_text("keep")
    before = set(out_dir.iterdir())
    assert_refused(run_cli(str(run), "-o", out), "--force", out_dir, before)
    assert (out_dir / "m.gguf").read_text() == "keep"
    ok = run_cli(str(run), "-o", out, "--force", "--quant", "q8_0", "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    assert (out_dir / "m.gguf").read_bytes()[:4] == b"GGUF"
    assert "ollama create m -f" in ok.output and "llama-cli -m" in ok.output


def test_unsupported_rope_and_gemma_scaling_are_refused():
    from qlora_cli.errors import ModelError

    llama = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    with pytest.raises(ModelError, match="rope type 'yarn'"):
        arch_mod.arch_spec({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    gemma = {**llama, "model_type": "gemma2", "head_dim": 16, "query_pre_attn_scalar": 256}
    with pytest.raises(ModelError, match="query_pre_attn_scalar"):
        arch_mod.arch_spec(gemma)
    with pytest.raises(ModelError, match="without final_logit_softcapping"):  # llama.cpp would cap at 30
        arch_mod.arch_spec({**gemma, "query_pre_attn_scalar": 16, "final_logit_softcapping": None})


def test_llama3_rope_factors_follow_the_scaling_rule():
    """Llama 3.1's rope_freqs: 1 for short wavelengths, `factor` for long ones, and between them the value
    transformers' own llama3 rope computes (compared through the inverse frequencies it returns)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope["original_max_position_embeddings"] = 8192
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_scaling={**rope, "rope_theta": 500000.0})
    ours = arch_mod.llama3_rope_factors({"rope_parameters": {**rope, "rope_theta": 500000.0}}, 128)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    np.testing.assert_allclose(ours, (base / inv_freq).numpy(), rtol=1e-4)
    assert ours[0] == 1.0 and ours[-1] == 8.0 and ((ours > 1) & (ours < 8)).any()


@pytest.mark.parametrize(
    "name,family",
    [("chatml", "chatml"), ("qwen2.5", "qwen2.5"), ("llama3", "llama3"), ("gemma", "gemma")]
    + [("mistral", "mistral"), ("phi3", "phi3"), ("llama2", None), ("alpaca", None)],
)
def test_modelfile_template_only_where_it_renders_what_the_run_renders(name, family):
    """The Go template's Python twin must render the run's Jinja template's text on every probe conversation;
    Llama 2's <<SYS>> template and alpaca have no Ollama twin here and get no TEMPLATE."""
    from qlora_cli.data.chat_templates import TEMPLATES
    from qlora_cli.export.ollama import matching_family
    from qlora_cli.testing.tiny import build_char_tokenizer

    found = matching_family(build_char_tokenizer(chat_template=TEMPLATES[name][0]))
    assert (found and found.name) == family
    text = modelfile_text(Path("x.gguf"), found)
    assert text.startswith("FROM ./x.gguf\n")
    assert ("TEMPLATE" in text.replace("no TEMPLATE", "")) == (family is not None)
    stops = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
    stops |= {"mistral": "[INST]", "phi3": "<|end|>"}
    if family:
        assert f'PARAMETER stop "{stops[name]}"' in text
    assert ("SYSTEM" in text) == (name == "qwen2.5")  # Qwen's default system prompt


def test_a_twin_that_renders_differently_is_not_used():
    """One character off (a space after [/INST]) and the Mistral template no longer matches."""
    from qlora_cli.data.chat_templates import TEMPLATES
    from qlora_cli.export.ollama import matching_family
    from qlora_cli.testing.tiny import build_char_tokenizer

    changed = TEMPLATES["mistral"][0].replace("' [/INST]'", "' [/INST] '")
    assert changed != TEMPLATES["mistral"][0]
    assert matching_family(build_char_tokenizer(chat_template=changed)) is None


def test_modelfile_names_and_an_existing_modelfile(tmp_path):
    from qlora_cli.errors import ModelError
    from qlora_cli.export.ollama import check_modelfile

    assert modelfile_path(Path("/a/bot.Q4_0.gguf"), "q4_0") == Path("/a/bot.Modelfile")
    assert modelfile_path(Path("/a/bot-f16.gguf"), "q8_0") == Path("/a/bot-f16.Modelfile")
    mine = tmp_path / "bot.Modelfile"
    mine.write_text("FROM ./bot.Q8_0.gguf\nPARAMETER temperature 0.2\n")
    check_modelfile(mine, tmp_path / "bot.Q8_0.gguf", force=False)  # this file's own: replaced on re-export
    with pytest.raises(ModelError, match="not this file's Modelfile"):
        check_modelfile(mine, tmp_path / "bot.Q4_0.gguf", force=False)  # another quant's, or hand-written
    check_modelfile(mine, tmp_path / "bot.Q4_0.gguf", force=True)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_tensors_converted_in_row_blocks_are_byte_identical(tmp_path, data, monkeypatch, quant):
    """Large tensors are converted a block of rows at a time (bounded memory): the file is the same bytes as
    when every tensor goes whole."""
    import qlora_cli.export as export_mod

    run = family_run(tmp_path, "qwen2", "qwen2", data)
    whole, blocks = tmp_path / "whole.gguf", tmp_path / "blocks.gguf"
    run_export(run, whole, quant=quant, verify=False, device="cpu", console=QUIET)
    monkeypatch.setattr(export_mod, "CHUNK_BYTES", 7 * 64 * 4)  # 7 rows of a 64-wide tensor: uneven blocks
    calls = []
    real = export_mod._encode
    monkeypatch.setattr(export_mod, "_encode", lambda spec, p, t: calls.append(t.shape[0]) or real(spec, p, t))
    run_export(run, blocks, quant=quant, verify=False, device="cpu", console=QUIET)
    assert 7 in calls and len(calls) > 40  # the embedding and MLP weights went in blocks
    assert whole.read_bytes() == blocks.read_bytes()


def test_llama31_rope_scaling_is_written_as_rope_freqs(tmp_path, data):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope |= {"original_max_position_embeddings": 64, "rope_theta": 10000.0}
    run = family_run(tmp_path, "llama", "llama3", data, init={"rope_parameters": rope})
    out = tmp_path / "m.gguf"
    result = run_export(run, out, quant="f32", device="cpu", console=QUIET)
    assert result.check.passed, result.check.problems  # read with the base's config: see check.py
    freqs = read_gguf(out)["rope_freqs.weight"]
    assert freqs.tolist() == arch_mod.llama3_rope_factors({"rope_parameters": rope}, 16).tolist()
    assert freqs[0] == 1.0 and freqs[-1] == 8.0  # short wavelengths kept, long ones scaled by the factor


def test_a_chatml_template_with_its_own_default_system_message_gets_ollamas_system():
    """SmolLM2's template adds "You are a helpful AI assistant named SmolLM..." when there is no system
    message: the Modelfile's SYSTEM carries it, so Ollama renders the same text."""
    from qlora_cli.data.chat_templates import CHATML_TEMPLATE
    from qlora_cli.export.ollama import matching_family
    from qlora_cli.testing.tiny import build_char_tokenizer

    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + default + "<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    found = matching_family(build_char_tokenizer(chat_template=template))
    assert found is not None and found.name == "chatml" and found.system == default
    assert f'SYSTEM """{default}"""' in modelfile_text(Path("x.gguf"), found)
    assert matching_family(build_char_tokenizer(chat_template=CHATML_TEMPLATE)).system is None


@pytest.mark.parametrize("error", [(28, "No space left on device"), (13, "Permission denied")])
def test_a_write_that_fails_midway_leaves_nothing(tmp_path, data, monkeypatch, error):
    """The disk fills up (or a permission is missing) after some tensors are written: one error: line, exit 2,
    and neither the GGUF, its temporary file nor a Modelfile is left."""
    import qlora_cli.export as export_mod

    run = family_run(tmp_path / "r", "llama", "llama3", data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real, calls = export_mod._write_tensor, []

    def failing(writer, chunks, nbytes):
        calls.append(nbytes)
        if len(calls) == 5:
            raise OSError(error[0], error[1], str(out_dir / ".m.tmp"))
        return real(writer, chunks, nbytes)

    monkeypatch.setattr(export_mod, "_write_tensor", failing)
    result = run_cli(str(run), "-o", str(out_dir / "m.gguf"), "--device", "cpu")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error:") and error[1] in lines[-1]
    assert len(calls) == 5 and list(out_dir.iterdir()) == []


def test_a_reader_that_ignores_the_pre_tokenizer_is_not_taken_for_a_wrong_file(tmp_path, data, monkeypatch):
    """transformers 5.0's GGUF reader splits every byte-level file with GPT-2's pattern; a Llama 3-style file
    then reads back with other ids on newlines, through no fault of the file. The check says so and passes."""
    import qlora_cli.export.check as check_mod

    run = family_run(tmp_path, "llama", "llama3", data)
    monkeypatch.setattr(check_mod, "reader_splits_like", lambda pre: False)
    result = run_export(run, tmp_path / "m.gguf", quant="f32", device="cpu", console=QUIET)
    assert result.check.passed, result.check.problems
    problems, note = check_mod.tokenizer_problems(build_bpe_tokenizer("llama3"), tmp_path / "m.gguf")
    assert problems == [] and "ignores the 'llama-bpe' pre-tokenizer" in note

    monkeypatch.setattr(check_mod, "modern_tokenizer_reader", lambda: False)  # transformers 5.0's reader
    problems, note = check_mod.tokenizer_problems(build_bpe_tokenizer("sentencepiece"), tmp_path / "m.gguf")
    assert problems == [] and "GGUF tokenizer reader is too old" in note


@pytest.mark.parametrize("kind,max_err", [("Q4_K", 0.085), ("Q6_K", 0.022)])
def test_k_quant_blocks_read_back_by_the_gguf_package(kind, max_err):
    """qlora writes Q4_K and Q6_K itself (the gguf package only reads them): its dequantizer recovers the
    weights to 4- and 6-bit accuracy (a wrong bit layout gives errors near 100%), and an all-zero row stays 0."""
    from qlora_cli.export.kquants import QUANTIZERS

    x = np.random.default_rng(0).standard_normal((6, 768)).astype(np.float32) * 0.02
    x[3] = 0.0
    x[4, :256] *= 50  # blocks of very different ranges in one row
    blocks = QUANTIZERS[kind](x)
    assert blocks.dtype == np.uint8 and blocks.shape == (6, 3 * {"Q4_K": 144, "Q6_K": 210}[kind])
    y = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind])
    for row in (0, 1, 2, 4, 5):
        err = np.sqrt(((y[row] - x[row]) ** 2).mean() / (x[row] ** 2).mean())
        assert err < max_err, (row, err)  # measured: Q4_K 0.077, Q6_K 0.019 on normal weights
    assert not y[3].any()
    from qlora_cli.export import kquants

    one_call = {"Q4_K": kquants.quantize_q4_k, "Q6_K": kquants.quantize_q6_k}[kind](x)
    assert np.array_equal(blocks, one_call)  # the row blocks quantized in threads: the same bytes


def test_q4_k_m_recipe():
    """llama-quantize's Q4_K_M: Q6_K for the output head and for attn_v / ffn_down in the first and last
    eighth of the layers and every third layer between; Q4_K elsewhere; rows that 256 does not divide: q8_0."""
    t = arch_mod.tensor_type
    assert t("q4_k_m", "output.weight", (32000, 4096), 32) == "Q6_K"
    assert t("q4_k_m", "token_embd.weight", (32000, 4096), 32) == "Q4_K"
    six = [i for i in range(32) if t("q4_k_m", f"blk.{i}.attn_v.weight", (1024, 4096), 32) == "Q6_K"]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert {t("q4_k_m", f"blk.{i}.attn_q.weight", (4096, 4096), 32) for i in range(32)} == {"Q4_K"}
    assert t("q4_k_m", "blk.0.attn_q.weight", (576, 576), 30) == "Q8_0"  # SmolLM2's rows: 576 = 2.25 x 256
    assert t("q6_k", "blk.5.ffn_up.weight", (1536, 576), 30) == "Q8_0" and t("q6_k", "x.weight", (8, 512)) == "Q6_K"
    assert t("q4_k_m", "blk.0.attn_norm.weight", (4096,), 32) == "F32"


@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k"])
def test_k_quant_exports_pass_the_self_check(tmp_path, data, quant):
    run = family_run(tmp_path, "llama", "llama3", data, init={"hidden": 256, "intermediate": 512})
    out = tmp_path / f"m.{quant}.gguf"
    result = run_export(run, out, quant=quant, device="cpu", console=QUIET)
    assert result.check.passed, result.check.problems
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == ("Q4_K" if quant == "q4_k_m" else "Q6_K")
    assert types["output.weight"] == "Q6_K" and types["output_norm.weight"] == "F32"
    assert field(out, "general.file_type") == arch_mod.QUANTS[quant][1]


def test_an_export_killed_midway_leaves_temp_files_the_next_one_removes(tmp_path, data):
    """A temporary file names its export's pid: the next export into the same output deletes the files of
    exports that are gone (kill -9) and keeps those of one still running."""
    import os

    run = family_run(tmp_path / "r", "llama", "llama3", data)
    out = tmp_path / "m.gguf"
    dead = tmp_path / ".m.gguf.qlora-export-4194999-abc.gguf"  # above Linux's pid_max default: no such process
    alive = tmp_path / f".m.gguf.qlora-export-{os.getppid()}-def.gguf"
    other = tmp_path / ".n.gguf.qlora-export-4194999-ghi.gguf"  # another output's
    for f in (dead, alive, other):
        f.write_bytes(b"GGUF partial")
    run_export(run, out, quant="f16", verify=False, device="cpu", console=QUIET)
    assert out.exists() and not dead.exists() and alive.exists() and other.exists()


def test_an_output_that_is_an_input_is_refused_even_with_force(tmp_path, data):
    """--force replaced the run's adapter, the base's weights or its tokenizer with the GGUF file."""
    import os

    run = family_run(tmp_path / "llama", "llama", "llama3", data)
    base = tmp_path / "llama" / "base"
    os.link(run / "adapter_model.safetensors", tmp_path / "hard-link.gguf")
    targets = [
        run / "adapter_model.safetensors", run / "qlora_config.yaml", base / "model.safetensors",
        base / "tokenizer.json", tmp_path / "hard-link.gguf",
    ]  # fmt: skip
    for fmt in ("gguf", "gguf-lora"):
        for target in targets:
            before = target.read_bytes()
            result = run_cli(str(run), "-o", str(target), "--force", "--format", fmt, "--device", "cpu")
            assert result.exit_code == 2, (fmt, target, result.output)
            assert "which this export reads" in result.output and "Traceback" not in result.output
            assert target.read_bytes() == before, (fmt, target)


@pytest.mark.parametrize("where", ["run", "base"])
def test_an_output_beside_a_run_or_a_model_is_checked_on_the_file_alone(tmp_path, data, where):
    """The self-check used to load the output's whole folder: inside a run folder transformers followed its
    adapter_config.json (a traceback); beside a model, that model's tokenizer files replaced the file's own."""
    run = family_run(tmp_path / "llama", "llama", "llama3", data)
    folder = run
    if where == "base":  # another model's folder, with a chat template the file does not carry
        folder = tmp_path / "other-model"
        shutil.copytree(tmp_path / "llama" / "base", folder)
        (folder / "chat_template.jinja").write_text(
            "{{ 'other' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        )
    result = run_cli(str(run), "-o", str(folder / "m.gguf"), "--quant", "f32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "DIFFERS" not in result.output and "Traceback" not in result.output
    assert (folder / "m.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("fmt", ["gguf", "gguf-lora"])
def test_a_non_finite_adapter_is_refused_before_export(tmp_path, data, fmt):
    from safetensors.torch import load_file, save_file

    run = family_run(tmp_path / "llama", "llama", "llama3", data)
    tensors = load_file(run / "adapter_model.safetensors")
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, run / "adapter_model.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli(str(run), "-o", str(out_dir / "m.gguf"), "--format", fmt, "--device", "cpu")
    assert_refused(result, "NaN/inf", out_dir, set())
    assert "q8_0" not in result.output  # not blamed on rounding


def test_a_vocabulary_with_a_duplicate_token_is_refused_for_llama_cpp(tmp_path):
    """A GGUF base whose tokens repeat one (a warning at train time: transformers keeps the later id) would be
    copied into the export as it is, which llama.cpp refuses at load."""
    import re

    from qlora_cli.errors import ModelError
    from qlora_cli.export.gguf_vocab import vocab_metadata

    from .gguf_files import byte_level_tokens, write_tiny_gguf

    tokens = [*byte_level_tokens(), "he", "<|im_start|>", "<|im_end|>"]
    tokens[11] = tokens[10]  # a plain byte token twice; BOS and EOS stay unique
    path = write_tiny_gguf(tmp_path / "dup.gguf", tokens=tokens)

    class Tokenizer:
        chat_template = None

    with pytest.raises(ModelError, match=re.escape(f"holds {tokens[10]!r} twice (ids 10 and 11); llama.cpp refuses")):
        vocab_metadata(Tokenizer(), len(tokens), str(path))
    good = write_tiny_gguf(tmp_path / "good.gguf")
    assert len(vocab_metadata(Tokenizer(), len(tokens), str(good))["tokenizer.ggml.tokens"]) == len(tokens)
