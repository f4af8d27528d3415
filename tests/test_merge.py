"""qlora merge: merged logits equal the adapter's, bit-exact NF4 reproduction, streaming memory, safety."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qlora_cli import merge as merge_mod
from qlora_cli.cli import app
from qlora_cli.config import dump_config
from qlora_cli.errors import ModelError
from qlora_cli.merge import (
    OutTensor,
    SafetensorsWriter,
    read_header,
    run_merge,
    self_check,
)
from qlora_cli.merge import plan as merge_plan
from qlora_cli.merge import weights as merge_weights
from qlora_cli.merge.weights import nf4_roundtrip
from qlora_cli.model.adapter_io import save_adapter
from qlora_cli.model.loading import load_base_model
from qlora_cli.model.lora import inject_lora, lora_layers
from qlora_cli.run_folder import load_adapted_model, open_run
from qlora_cli.testing.tiny import build_tiny_model

from .conftest import make_config, upper_rows, write_jsonl

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


def make_run(base: Path, out: Path, data: Path, b_std: float = 0.05, seed: int = 0, **kw) -> Path:
    """A run folder with a random (non-zero B) adapter, as `qlora train` would leave it."""
    cfg = make_config(base, data, out, **kw)
    plain = make_config(base, data, out, **{**kw, "load_in_4bit": False})
    model = load_base_model(plain, CPU)  # the adapter's shapes do not depend on quantization
    torch.manual_seed(seed)
    inject_lora(model, cfg.lora)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=b_std)
    save_adapter(model, out, cfg.lora, cfg.base_model)
    (out / "qlora_config.yaml").write_text(dump_config(cfg))
    return out


def quiet_merge(run: Path, out: Path, **kw):
    from rich.console import Console

    kw.setdefault("device", "cpu")
    kw.setdefault("verify", False)
    return run_merge(run, out, console=Console(quiet=True), **kw)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def load_merged(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    assert set(out) == set(index["weight_map"])
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and much faster when other test processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("merge-data") / "d.jsonl", upper_rows(16, seed=3))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(6, 90, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# pure pieces


def test_streaming_writer_reads_back_with_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.tensor(2.5, dtype=torch.float16),  # 0-dim
        "e": torch.zeros(0, 4),  # empty
        "f": torch.tensor([True, False, True]),
    }
    code = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16", torch.bool: "BOOL"}
    entries = [OutTensor(k, code[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", entries, {"format": "pt"})
    for k, t in tensors.items():
        writer.write(k, [merge_mod.tensor_bytes(t)])
    writer.close()
    back = load_file(tmp_path / "x.safetensors")
    assert all(same_bytes(back[k], t) for k, t in tensors.items())
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # and our reader reads what safetensors writes
    save_file(tensors, tmp_path / "y.safetensors")
    infos, _ = read_header(tmp_path / "y.safetensors")
    with open(tmp_path / "y.safetensors", "rb") as f:
        assert all(same_bytes(merge_mod.read_tensor(f, i), tensors[i.name]) for i in infos)


def test_base_tensor_names_with_and_without_the_base_model_prefix(model_factory):
    """Older GPT-2 checkpoints store `h.0.attn.c_attn.weight`, not `transformer.h.0.attn.c_attn.weight`."""
    skeleton = merge_mod.model_skeleton(model_factory("gpt2", initializer_range=0.1), False)
    module = "transformer.h.0.attn.c_attn"
    assert merge_plan.base_tensor_name(module, skeleton, {f"{module}.weight": None}) == f"{module}.weight"
    assert merge_plan.base_tensor_name(module, skeleton, {"h.0.attn.c_attn.weight": None}) == "h.0.attn.c_attn.weight"
    assert merge_plan.base_tensor_name(module, skeleton, {"h.1.attn.c_attn.weight": None}) is None


def test_report_warns_when_nf4_error_dominates_with_original_weights():
    from rich.console import Console

    layers = [merge_mod.LayerStat(f"model.layers.{i}.self_attn.q_proj", 1e-3, 3.0) for i in range(3)]
    result = merge_mod.MergeResult(Path("m"), "bfloat16", "original", 10, 3, 1, 100, 1.0, layers, None)
    console = Console(record=True, width=200)
    merge_mod.print_report(console, result)
    assert "in 3/3 layers the NF4 quantization error is larger than the learned delta" in console.export_text()
    console = Console(record=True, width=200)
    merge_mod.print_report(console, replace(result, base_weights="dequantized"))
    assert "warning" not in console.export_text()


@pytest.mark.parametrize(
    "arch,quant_type,double_quant,compute",
    [("llama", "nf4", True, "float32"), ("llama", "fp4", False, "bfloat16"), ("gpt2", "nf4", True, "bfloat16")],
)
def test_nf4_roundtrip_is_bit_identical_to_the_training_time_base(
    model_factory, data, tmp_path, arch, quant_type, double_quant, compute
):
    """dequant(NF4(W)) computed by merge equals what the 4-bit base that training loads holds, bit for bit."""
    import bitsandbytes.functional as bnbf

    base = model_factory(arch, initializer_range=0.1)
    cfg = make_config(
        base, data, tmp_path / "r", bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute,
    )  # fmt: skip
    model = load_base_model(cfg, CPU)
    base_tensors = load_file(base / "model.safetensors")
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    if arch == "gpt2":
        names = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.0.mlp.c_fc"]
    for name in names:
        layer = model.get_submodule(name)
        trained_on = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        w = base_tensors[f"{name}.weight"]
        mine = nf4_roundtrip(w.T if arch == "gpt2" else w, cfg.quant)  # Conv1D stores (in, out)
        assert mine.dtype == trained_on.dtype and torch.equal(mine, trained_on), name
        assert not torch.equal(mine.float(), (w.T if arch == "gpt2" else w).float())  # it did quantize


def test_nf4_error_estimate_is_close_to_the_exact_error():
    from qlora_cli.config import QuantSettings

    quant = QuantSettings(compute_dtype="float32")
    w = torch.randn(8192, 128) * torch.linspace(0.5, 2.0, 8192)[:, None]  # rows differ in scale
    exact = torch.linalg.vector_norm(w - nf4_roundtrip(w, quant)).item()
    estimate = merge_weights.nf4_error_estimate(w, quant)  # from every 4th row
    assert estimate != exact and abs(estimate - exact) < 0.03 * exact


# ---------------------------------------------------------------------------------------------
# merged == adapter


def test_16bit_run_merges_exactly(llama_dir, data, tmp_path, ids):
    run = make_run(llama_dir, tmp_path / "run", data, load_in_4bit=False, lora_target_modules="all-linear")
    out = tmp_path / "merged"
    result = quiet_merge(run, out, dtype="float32", max_shard_size="40KB")
    assert result.shards > 1 and result.n_merged == 14
    assert len(list(out.glob("model-*.safetensors"))) == result.shards
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()

    adapted, _ = load_adapted_model(open_run(run), CPU)
    merged, plain = load_merged(out), load_merged(llama_dir)
    expected = logits(adapted, ids)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-4, rtol=0)
    assert (logits(plain, ids) - expected).abs().max() > 0.05  # the adapter matters, so the test can fail

    base_t, out_t = load_file(llama_dir / "model.safetensors"), merged_tensors(out)
    targeted = {f"{n}.weight" for n, _ in lora_layers(adapted)}
    assert targeted and set(out_t) == set(base_t)
    for name, t in base_t.items():
        if name in targeted:
            assert not torch.equal(out_t[name], t), name
        else:
            assert same_bytes(out_t[name], t), name  # untargeted: bit for bit


@pytest.mark.oldest
def test_4bit_run_dequantized_and_original(llama_dir, data, tmp_path, ids):
    """dequantized reproduces the 4-bit training-time model; original the adapter on the 16-bit base; the
    two differ, and the dequantized one is the closer to what was trained."""
    from qlora_cli.scoring import generate

    run = make_run(llama_dir, tmp_path / "run", data, lora_target_modules="all-linear")
    deq = quiet_merge(run, tmp_path / "deq", dtype="float32", verify=True)
    orig = quiet_merge(run, tmp_path / "orig", dtype="float32", base_weights="original")
    assert deq.check.passed, deq.check
    assert deq.check.mean_kl < 1e-6 and deq.check.top1_agreement == 1.0 and deq.check.adapter_kl > 0.01
    assert deq.check.training_kl is None  # every linear layer targeted: the reference is the training-time model
    assert all(s.quant_err_rel is not None and s.quant_err_rel > 0 for s in orig.layers)

    training, tok = load_adapted_model(open_run(run), CPU)  # the 4-bit base + adapter, as trained
    expected = logits(training, ids)
    m_deq, m_orig = load_merged(tmp_path / "deq"), load_merged(tmp_path / "orig")
    torch.testing.assert_close(logits(m_deq, ids), expected, atol=1e-4, rtol=0)
    err_orig = (logits(m_orig, ids) - expected).abs().max()
    assert err_orig > 1e-3  # merging into the original weights is not what was trained

    opened = open_run(run)
    sixteen = replace(opened.model, quant=replace(opened.model.quant, load_in_4bit=False))
    on_16bit, _ = load_adapted_model(opened, CPU, model=sixteen)
    torch.testing.assert_close(logits(m_orig, ids), logits(on_16bit, ids), atol=1e-4, rtol=0)

    # the merged folder generates the adapter's greedy tokens with plain transformers
    tok.padding_side = "left"
    prompts = [list(tok(r["prompt"])["input_ids"]) for r in upper_rows(6, seed=9)]
    assert generate(m_deq, tok, prompts, max_new_tokens=8) == generate(training, tok, prompts, max_new_tokens=8)


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_gpt2_conv1d_and_tied_embeddings(model_factory, data, tmp_path, ids, load_in_4bit):
    """GPT-2 stores c_attn/c_proj/c_fc as Conv1D (in, out) weights, c_proj square; its embeddings are tied."""
    base = model_factory("gpt2", initializer_range=0.1)
    run = make_run(
        base, tmp_path / "run", data, load_in_4bit=load_in_4bit, lora_target_modules=["c_attn", "c_proj", "c_fc"]
    )
    assert json.loads((run / "adapter_config.json").read_text())["fan_in_fan_out"] is True  # saved from a 16-bit model
    quiet_merge(run, tmp_path / "m", dtype="float32")
    adapted, _ = load_adapted_model(open_run(run), CPU)
    merged = load_merged(tmp_path / "m")
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # still tied
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), atol=1e-4, rtol=0)


def test_default_dtype_follows_the_base_shards(tmp_path, data):
    """A bfloat16 checkpoint merges to bfloat16 with untargeted tensors bit for bit; float32 becomes bfloat16."""
    base = build_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16, initializer_range=0.1)
    run = make_run(base, tmp_path / "run", data, load_in_4bit=False)
    result = quiet_merge(run, tmp_path / "m")
    assert result.dtype == "bfloat16"
    out_t, base_t = merged_tensors(tmp_path / "m"), load_file(base / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in out_t.values())
    assert same_bytes(out_t["model.embed_tokens.weight"], base_t["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# memory


MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    from rich.console import Console
    from qlora_cli.merge import run_merge

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    warm_run, run, out = sys.argv[1:4]
    run_merge(warm_run, out + "-warm", verify=False, device="cpu", console=Console(quiet=True))  # imports, caches
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    run_merge(run, out, verify=False, device="cpu", max_shard_size="8MB", console=Console(quiet=True))
    print(status("VmHWM:") - before)
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_peak_memory_is_bounded_by_a_shard_not_the_model(tmp_path, data, llama_dir):
    from transformers import AutoModelForCausalLM

    built = build_tiny_model(tmp_path / "built", "llama", hidden=256, layers=24, intermediate=768)
    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(built).save_pretrained(base, max_shard_size="8MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(built / name, base / name)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert len(list(base.glob("*.safetensors"))) >= 8 and model_bytes > 70e6
    run = make_run(base, tmp_path / "run", data, lora_target_modules=["q_proj", "v_proj", "down_proj"])  # 4-bit
    warm = make_run(llama_dir, tmp_path / "warm", data)
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(warm), str(run), str(tmp_path / "m")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    peak = int(probe.stdout.split()[-1])
    # one 8 MB shard read and one written, plus allocator slack: 10-12.5 MB measured idle, 16.7 MB once under load
    assert peak < 3 * 8e6 < model_bytes / 3, (
        f"merge grew RSS by {peak / 1e6:.1f} MB for a {model_bytes / 1e6:.0f} MB model"
    )
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) >= 4


# ---------------------------------------------------------------------------------------------
# the self-check and the command line


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_user_error(result, fragment: str, out: Path) -> None:
    """Exit 2, one line naming the problem, and no output or temporary folder left behind."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, llama_dir, data) -> Path:
    return make_run(llama_dir, tmp_path_factory.mktemp("small") / "run", data, b_std=0.02)


def test_cli_merge_passes_and_self_check_catches_a_corrupted_merge(small_run, tmp_path, monkeypatch):
    ok = run_cli("merge", str(small_run), "--output", str(tmp_path / "ok"), "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    assert "self-check passed" in ok.stderr and (tmp_path / "ok" / "model.safetensors.index.json").exists()
    assert "targeted layers" in ok.stderr  # q_proj, v_proj only: the other linear layers keep their weights

    real = merge_mod.merged_weight

    def wrong_sign(weight, target, scaling, *args):  # a classic bug: the delta subtracted
        return real(weight, target, -scaling, *args)

    monkeypatch.setattr(merge_mod, "merged_weight", wrong_sign)
    bad = run_cli("merge", str(small_run), "--output", str(tmp_path / "bad"), "--device", "cpu")
    assert bad.exit_code == 1, bad.output
    assert "self-check FAILED" in bad.stderr


def test_self_check_catches_one_layer_left_unmerged(small_run, tmp_path):
    """One layer of fourteen merged into the wrong weights (the original instead of dequantized)."""
    out = tmp_path / "m"
    quiet_merge(small_run, out, dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.v_proj.weight"
    shard = out / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = load_file(Path(open_run(small_run).model.base_model) / "model.safetensors")[name]  # no delta
    save_file(tensors, shard, metadata={"format": "pt"})
    check = self_check(open_run(small_run), out, "dequantized", CPU)
    assert not check.passed and check.problems, check


def test_user_errors_exit_2_and_write_nothing(small_run, tmp_path, model_factory, data):
    out = tmp_path / "out"
    assert_user_error(run_cli("merge", str(tmp_path / "nope"), "-o", str(out)), "run folder not found", out)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert_user_error(run_cli("merge", str(small_run), "-o", str(out)), "not empty", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    fresh = tmp_path / "fresh"
    other = model_factory("llama", hidden=32)  # the same module names, other shapes
    assert_user_error(run_cli("merge", str(small_run), "-o", str(fresh), "--base", str(other)), "q_proj", fresh)
    gpt2 = model_factory("gpt2", initializer_range=0.1)
    assert_user_error(
        run_cli("merge", str(small_run), "-o", str(fresh), "--base", str(gpt2)), "no linear module named", fresh
    )
    assert_user_error(
        run_cli("merge", str(small_run), "-o", str(fresh), "--base-weights", "new"), "base-weights", fresh
    )
    assert_user_error(run_cli("merge", str(small_run), "-o", str(fresh), "--max-shard-size", "big"), "shard", fresh)
    assert_user_error(run_cli("merge", str(small_run), "-o", str(small_run), "--force"), "would replace", small_run)
    assert not fresh.exists()
    with pytest.raises(ModelError, match="does not fit"):
        quiet_merge(small_run, fresh, base=str(other))


def test_force_replaces_a_non_empty_output(small_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = run_cli("merge", str(small_run), "-o", str(out), "--force", "--no-verify", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_a_failed_write_in_the_background_stops_the_merge_and_publishes_nothing(small_run, tmp_path, monkeypatch):
    """Merged tensors are written by a second thread; its error reaches the caller, and the output folder and
    the temporary one are gone."""
    real_write = merge_mod.SafetensorsWriter.write
    calls = []

    def failing_write(self, name, chunks):
        calls.append(name)
        if len(calls) == 6:
            raise OSError(28, "No space left on device")
        return real_write(self, name, chunks)

    monkeypatch.setattr(merge_mod.SafetensorsWriter, "write", failing_write)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        quiet_merge(small_run, out, verify=False)
    assert len(calls) == 6 and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind
    calls.clear()
    result = run_cli("merge", str(small_run), "-o", str(out), "--no-verify", "--device", "cpu")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output  # the disk, not a bug in qlora
    assert lines[-1].startswith("error:") and "No space left on device" in lines[-1] and not out.exists()


def test_stale_temp_folders_go_and_outputs_get_the_usual_modes(small_run, tmp_path):
    """A merge killed with -9 leaves `.out.tmp-*` beside the output: the next merge removes it (a running
    merge's folder, whose owner process is alive, stays). The merged folder and files get mkdir/open's modes
    under the umask (0755/0644), not mkdtemp's 0700."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".out.tmp-crashed"
    stale.mkdir()
    (stale / ".qlora-merge-pid").write_text(dead.stdout.strip())
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    running = tmp_path / ".out.tmp-running"
    running.mkdir()
    (running / ".qlora-merge-pid").write_text(str(os.getpid()))
    old_umask = os.umask(0o022)
    try:
        result = run_cli("merge", str(small_run), "-o", str(tmp_path / "out"), "--no-verify", "--device", "cpu")
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-running", "out"]
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}
    assert not (out / ".qlora-merge-pid").exists()
    assert (small_run / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
