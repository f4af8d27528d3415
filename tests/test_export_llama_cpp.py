"""llama.cpp itself runs qlora's GGUF files: the same logits, greedy tokens and token ids as the merged model,
for every supported family, and the GGUF LoRA applied to the base GGUF gives the merged model's logits.

llama.cpp is reached through llama-cpp-python (it builds llama.cpp from source: `pip install
llama-cpp-python`, several minutes). It runs in its own interpreter: the current one when it has
``llama_cpp``, else the one ``QLORA_LLAMA_CPP_PYTHON`` names (a venv of its own works: it needs only
llama-cpp-python and numpy). Without either, every test here is skipped and says so; CI does not build it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qlora_cli.export import run_export

from .test_export import TEXTS, family_run
from .test_merge import quiet_merge


def llama_cpp_python() -> str | None:
    if os.environ.get("QLORA_LLAMA_CPP_PYTHON"):
        return os.environ["QLORA_LLAMA_CPP_PYTHON"]
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


pytestmark = [
    pytest.mark.llama_cpp,
    pytest.mark.skipif(
        llama_cpp_python() is None,
        reason="llama-cpp-python is not installed (pip install llama-cpp-python, or set QLORA_LLAMA_CPP_PYTHON "
        "to a python that has it)",
    ),
]
QUIET = Console(quiet=True)
# llama.cpp keeps its KV cache in f16: float32 weights give logits within ~1e-3 of the largest logit
TOLERANCE = 2e-3

# Runs in llama-cpp-python's interpreter: a JSON request on stdin, a JSON answer on stdout.
WORKER = r"""
import ctypes, json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
req = json.load(sys.stdin)
kw = dict(n_ctx=256, verbose=False, logits_all=True, n_threads=1, seed=0)
if req.get("lora"):
    kw.update(lora_path=req["lora"], lora_scale=1.0)
llm = Llama(model_path=req["model"], **kw)
if req.get("lora") and not llm._lora_adapter:
    raise SystemExit("llama.cpp refused the LoRA file")
out = {"tokens": [llm.tokenize(t.encode(), add_bos=True, special=True) for t in req["texts"]], "logits": [], "greedy": []}
for ids in req["prompts"]:
    llm.reset()
    llm.eval(ids)
    out["logits"].append(np.array(llm.scores[: llm.n_tokens]).tolist())
    llm.reset()
    gen = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        gen.append(int(tok))
        if len(gen) == req["n_gen"]:
            break
    out["greedy"].append(gen)
print(json.dumps(out))
"""


def llama_cpp(model: Path, prompts: list[list[int]], texts: list[str], lora: Path | None = None, n_gen: int = 12):
    request = {"model": str(model), "lora": str(lora) if lora else None, "prompts": prompts, "texts": texts}
    request["n_gen"] = n_gen
    proc = subprocess.run(
        [llama_cpp_python(), "-c", WORKER], input=json.dumps(request), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hf_reference(folder: Path, prompts: list[list[int]], n_gen: int = 12):
    """(logits per prompt, greedy continuations) of the merged model in plain transformers, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    logits, greedy = [], []
    with torch.no_grad():
        for ids in prompts:
            logits.append(model(input_ids=torch.tensor([ids])).logits[0].float())
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=n_gen, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            greedy.append(out[0, len(ids) :].tolist())
    return logits, greedy


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from .conftest import upper_rows, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("lcpp-data") / "d.jsonl", upper_rows(8, 0))


LLAMA31_ROPE = {
    "rope_parameters": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    }
}  # fmt: skip  (Llama 3.1's rope scaling, its wavelength bands moved into a 16-wide head)


@pytest.mark.parametrize(
    "arch,kind,extra",
    [
        ("llama", "llama3", {}),
        ("llama", "llama3", LLAMA31_ROPE),  # written as llama.cpp's rope_freqs tensor
        ("mistral", "sentencepiece", {}),
        ("qwen2", "qwen2", {}),
        ("gemma2", "gemma", {}),
        ("phi3", "sentencepiece", {}),
    ],
)
def test_llama_cpp_runs_the_export_like_the_merged_model(tmp_path, data, arch, kind, extra):
    # weights large enough for decisive next-token choices, so greedy decoding is a real comparison
    run = family_run(tmp_path, arch, kind, data, init={"initializer_range": 0.1, **extra})
    out = tmp_path / "m.f32.gguf"
    result = run_export(run, out, quant="f32", device="cpu", console=QUIET)
    assert result.check.passed, result.check.problems
    merged = quiet_merge(run, tmp_path / "merged", dtype="float32").output
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False, add_generation_prompt=True)
    texts = [*TEXTS, chat]
    prompts = [tok(t)["input_ids"] for t in TEXTS[:2]]
    theirs = llama_cpp(out, prompts, texts)
    for text, ids in zip(texts, theirs["tokens"]):
        assert ids == tok(text)["input_ids"], text  # llama.cpp's tokenizer, from the file's metadata
    logits, greedy = hf_reference(merged, prompts)
    for ours, lc in zip(logits, theirs["logits"]):
        diff = (ours - torch.tensor(lc)).abs().max().item()
        assert diff < TOLERANCE * ours.abs().max().item(), diff
    assert theirs["greedy"] == greedy


def test_llama_cpp_applies_the_gguf_lora_to_the_base_gguf(tmp_path, data):
    run = family_run(tmp_path / "a", "llama", "llama3", data, init={"initializer_range": 0.1})
    zero = family_run(tmp_path / "z", "llama", "llama3", data, b_std=0.0, init={"initializer_range": 0.1})
    base, lora = tmp_path / "base.gguf", tmp_path / "lora.gguf"
    run_export(zero, base, quant="f32", base_weights="original", verify=False, device="cpu", console=QUIET)
    run_export(run, lora, fmt="gguf-lora", device="cpu", console=QUIET)
    merged = quiet_merge(run, tmp_path / "merged", dtype="float32", base_weights="original").output
    from transformers import AutoTokenizer

    prompts = [AutoTokenizer.from_pretrained(merged)(t)["input_ids"] for t in TEXTS[:2]]
    logits, greedy = hf_reference(merged, prompts)
    with_lora = llama_cpp(base, prompts, [], lora=lora)
    without = llama_cpp(base, prompts, [])
    for ours, lc, plain in zip(logits, with_lora["logits"], without["logits"]):
        assert (ours - torch.tensor(lc)).abs().max().item() < TOLERANCE * ours.abs().max().item()
        assert (ours - torch.tensor(plain)).abs().max().item() > 0.05  # the adapter matters
    assert with_lora["greedy"] == greedy


@pytest.mark.parametrize("quant,max_diff", [("q8_0", 0.1), ("q4_0", 0.3), ("q6_k", 0.1), ("q4_k_m", 0.3)])
def test_llama_cpp_and_transformers_read_the_quantized_file_alike(tmp_path, data, quant, max_diff):
    """Both readers dequantize the same blocks (the K-quants written by qlora itself): their logits differ only
    by llama.cpp quantizing activations for its integer dot products."""
    from .test_export import load_gguf_model

    k_quant = {"hidden": 256, "intermediate": 512} if "_k" in quant else {}  # K-quant rows: 256 values
    run = family_run(tmp_path, "llama", "llama3", data, init={"initializer_range": 0.1, **k_quant})
    out = tmp_path / f"m.{quant}.gguf"
    run_export(run, out, quant=quant, verify=False, device="cpu", console=QUIET)
    from transformers import AutoTokenizer

    prompts = [AutoTokenizer.from_pretrained(run.parent / "base")(t)["input_ids"] for t in TEXTS[:2]]
    theirs = llama_cpp(out, prompts, [])
    model = load_gguf_model(out, torch.device("cpu")).eval()
    with torch.no_grad():
        for ids, lc in zip(prompts, theirs["logits"]):
            ours = model(input_ids=torch.tensor([ids])).logits[0].float()
            diff = (ours - torch.tensor(lc)).abs().max().item()
            assert diff < max_diff * ours.abs().max().item(), diff
            agree = (ours.argmax(-1) == torch.tensor(lc).argmax(-1)).float().mean().item()
            assert agree >= 0.8, agree
