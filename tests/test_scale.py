"""Several processes (DDP over gloo on CPU) and sample packing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from qlora_cli.config import load_config
from qlora_cli.data.pipeline import IGNORE_INDEX, Row, collate_packed, pack_examples, packing_efficiency, tokenize_row
from qlora_cli.errors import ConfigError
from qlora_cli.model.loading import load_base_model
from qlora_cli.train.loop import check_packing_isolation, run_train
from qlora_cli.train.step import Precision

from .conftest import make_config, upper_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def launch(cfg_path: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    # `--multi_gpu` is accelerate's torchrun launcher; without a GPU the processes use gloo on the CPU
    # (accelerate's `--cpu --num_processes N` needs mpirun to start more than one process).
    cmd = [
        *ACCELERATE,
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        "-m",
        "qlora_cli",
        "train",
        str(cfg_path),
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def write_cfg(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, llama_dir):
    """One process with accumulation 4 vs two processes with accumulation 2, same examples and order.
    Dropout is on: its masks are seeded per micro-batch, so they do not depend on the process layout."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(tmp / "d.jsonl", upper_rows(45, seed=5))  # 12 micro-batches of 4, the last short
    common = dict(
        base_model=str(llama_dir),
        datasets=[{"path": str(data)}],
        bnb_4bit_compute_dtype="float32",
        micro_batch_size=4,
        max_steps=4,
        lora_dropout=0.1,
        optimizer="adamw_torch",
        learning_rate=2e-3,
        lora_target_modules="all-linear",
        logging_steps=1,
        gradient_checkpointing=False,
        device="cpu",
        save_steps=2,
        eval_datasets=[{"path": str(data)}],
    )
    one = write_cfg(tmp / "one.yaml", **common, gradient_accumulation_steps=4, output_dir=str(tmp / "one"))
    two = write_cfg(tmp / "two.yaml", **common, gradient_accumulation_steps=2, output_dir=str(tmp / "two"))
    ran = subprocess.run(
        [sys.executable, "-m", "qlora_cli", "train", str(one)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    ran = launch(two, 2)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return tmp, ran


@pytest.fixture(scope="module")
def fsdp_run(ddp_runs) -> Path:
    """``ddp_runs``' two-process config with ``fsdp: true`` (float32 quant storage), checkpoint at step 2, and
    ``best/``."""
    tmp, _ = ddp_runs
    cfg = yaml.safe_load((tmp / "two.yaml").read_text())
    cfg.update(fsdp=True, bnb_4bit_quant_storage="float32", output_dir=str(tmp / "fsdp"), save_best=True)
    ran = launch(write_cfg(tmp / "fsdp.yaml", **cfg), 2)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return tmp / "fsdp"


def test_fsdp2_over_two_processes_equals_one_with_twice_the_accumulation(ddp_runs, fsdp_run):
    """`fsdp: true`: the 4-bit base (in float32 storage), the adapter and AdamW's state sharded over two gloo
    processes with FSDP2, against the one-process run of ``ddp_runs`` (uint8 storage: the same numbers, tested
    below). Losses within 1e-5 relative; adapter within 1e-4 absolute (B moves by ~5e-3): FSDP2 reduce-scatters
    the gradients where DDP all-reduces, so float32 sums round differently in the last bits, and AdamW's first
    steps divide by sqrt(v), which carries those bits into updates of the learning rate's size."""
    tmp, _ = ddp_runs
    a, b = load_file(tmp / "one" / "adapter_model.safetensors"), load_file(fsdp_run / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)
    ra = [r for r in records(tmp / "one") if r["type"] in ("train", "eval")]
    rb = [r for r in records(fsdp_run) if r["type"] in ("train", "eval")]
    assert [(r["type"], r["step"]) for r in ra] == [(r["type"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        key = "loss" if x["type"] == "train" else "eval_loss"
        assert abs(x[key] - y[key]) < 1e-5 * abs(x[key])
    best = load_file(fsdp_run / "best" / "adapter_model.safetensors")  # the final eval is the only one: the best
    assert best.keys() == b.keys() and all(torch.equal(best[k], b[k]) for k in b)
    # a run folder like any other: one RNG file per process, the adapter and optimizer state saved whole
    step2 = fsdp_run / "checkpoints" / "step-2"
    assert {p.name for p in step2.glob("rng_state*.pt")} == {"rng_state.pt", "rng_state_1.pt"}
    moments = torch.load(step2 / "optimizer.pt", weights_only=True)["state"]
    saved = load_file(step2 / "adapter_model.safetensors")
    assert sorted(v["exp_avg"].numel() for v in moments.values()) == sorted(t.numel() for t in saved.values())


def test_fsdp_resumes_bit_exact_from_its_checkpoint(fsdp_run, tmp_path):
    """The FSDP run resumed from its step-2 checkpoint by two processes: the adapter and losses of the run that
    was never stopped, bit for bit (each process's shards of AdamW's moments cut again from the whole)."""
    again = tmp_path / "fsdp-resumed"
    shutil.copytree(fsdp_run, again)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (again / f).unlink()
    cfg = yaml.safe_load((fsdp_run.parent / "fsdp.yaml").read_text())
    ran = launch(write_cfg(tmp_path / "resume.yaml", **{**cfg, "output_dir": str(again)}), 2, "--resume")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "at step 2" in ran.stderr
    a, b = load_file(fsdp_run / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(again) if r["type"] == "train"] == [
        r["loss"] for r in records(fsdp_run) if r["type"] == "train"
    ]
    from tests.test_cli import run_cli  # the run folder is a normal one: merge takes it and checks itself

    merged = run_cli("merge", str(again), "--output", str(tmp_path / "merged"))
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "config.json").exists()


def test_a_checkpoint_resumes_only_with_the_processes_that_wrote_it(ddp_runs, tmp_path):
    from tests.test_cli import assert_user_error, run_cli

    tmp, _ = ddp_runs
    again = tmp_path / "two"
    shutil.copytree(tmp / "two", again)
    (again / "adapter_model.safetensors").unlink()
    cfg = yaml.safe_load((tmp / "two.yaml").read_text())
    before = sorted(p.name for p in again.rglob("*"))
    res = run_cli("train", str(write_cfg(tmp_path / "c.yaml", **{**cfg, "output_dir": str(again)})), "--resume")
    assert_user_error(res, "2 processes wrote it and this run has 1; resume it with 2 in all")
    assert sorted(p.name for p in again.rglob("*")) == before


def test_fsdp_launches_that_cannot_work_are_one_error_line(tmp_path, llama_dir):
    from tests.test_cli import assert_user_error, run_cli

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(8, seed=5))
    base = {"base_model": str(llama_dir), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o"),
            "device": "cpu", "fsdp": True}  # fmt: skip
    assert_user_error(
        run_cli("train", str(write_cfg(tmp_path / "c.yaml", **base))),
        "key 'fsdp': needs bnb_4bit_quant_storage: bfloat16 (the compute dtype)",
    )
    base["bnb_4bit_quant_storage"] = "bfloat16"
    assert_user_error(  # bitsandbytes' optimizers fail on sharded parameters (NotImplementedError in their op)
        run_cli("train", str(write_cfg(tmp_path / "c.yaml", **base, optimizer="paged_adamw_8bit"))),
        "key 'optimizer': paged_adamw_8bit cannot update FSDP's sharded parameters",
    )
    assert load_config(write_cfg(tmp_path / "c.yaml", **base)).optimizer == "adamw_torch"  # fsdp's default
    assert load_config(write_cfg(tmp_path / "c.yaml", **{**base, "fsdp": False})).optimizer == "paged_adamw_8bit"
    assert not (tmp_path / "o").exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(nodes: list[Path], launcher: str, *extra: str) -> list[subprocess.CompletedProcess]:
    """One job over two "machines" on 127.0.0.1: one launch per node, each in its own folder (its own copy of
    the model, data and config, and its own output folder), one process each."""
    port = str(free_port())
    procs = []
    for rank, node in enumerate(nodes):
        if launcher == "accelerate":
            cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank",
                   str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]  # fmt: skip
        cmd += ["-m", "qlora_cli", "train", "run.yaml", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as accelerate sets it: same sums
        procs.append(
            subprocess.Popen(cmd, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_two_nodes_without_a_shared_disk_train_and_resume_from_the_main_node(ddp_runs, tmp_path, llama_dir):
    """Two nodes, each with its own folder: the main node alone writes the run folder and its checkpoints (the
    other's RNG state is gathered into them); the job equals one process with twice the accumulation. Resumed
    from the main node's checkpoint (torchrun this time), which the other node never sees, it ends bit-exact."""
    tmp, _ = ddp_runs
    cfg = yaml.safe_load((tmp / "two.yaml").read_text())
    cfg.update(
        base_model="model", datasets=[{"path": "d.jsonl"}], eval_datasets=[{"path": "d.jsonl"}], output_dir="out"
    )
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        shutil.copytree(llama_dir, node / "model")
        shutil.copy(tmp / "d.jsonl", node / "d.jsonl")
        write_cfg(node / "run.yaml", **cfg)
    for ran in two_nodes(nodes, "accelerate"):
        assert ran.returncode == 0, ran.stderr[-3000:]
    main, other = nodes[0] / "out", nodes[1] / "out"
    assert not other.exists()  # the second node wrote nothing
    assert {p.name for p in (main / "checkpoints" / "step-2").glob("rng_state*.pt")} == {
        "rng_state.pt",
        "rng_state_1.pt",
    }
    a, b = load_file(tmp / "one" / "adapter_model.safetensors"), load_file(main / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)

    shutil.copytree(main, nodes[0] / "again")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (nodes[0] / "again" / f).unlink()
    for node in nodes:
        write_cfg(node / "run.yaml", **{**cfg, "output_dir": "again"})
    resumed = two_nodes(nodes, "torchrun", "--resume")
    for ran in resumed:
        assert ran.returncode == 0, ran.stderr[-3000:]
    assert "at step 2" in resumed[0].stderr
    assert not (nodes[1] / "again").exists()
    c = load_file(nodes[0] / "again" / "adapter_model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert [r["loss"] for r in records(nodes[0] / "again") if r["type"] == "train"] == [
        r["loss"] for r in records(main) if r["type"] == "train"
    ]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_with_twice_the_accumulation(ddp_runs):
    tmp, ran = ddp_runs
    assert "4 x 2 accumulation x 2 processes" in ran.stderr
    a, b = load_file(tmp / "one" / "adapter_model.safetensors"), load_file(tmp / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # the adapters did move
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    ra, rb = records(tmp / "one"), records(tmp / "two")
    # only the main process logs: one record per step, losses equal to the single-process run
    assert [r["step"] for r in rb if r["type"] == "train"] == [1, 2, 3, 4]
    for x, y in zip(
        [r for r in ra if r["type"] in ("train", "eval")], [r for r in rb if r["type"] in ("train", "eval")]
    ):
        assert x["type"] == y["type"] and x["step"] == y["step"]
        key = "loss" if x["type"] == "train" else "eval_loss"
        assert abs(x[key] - y[key]) < 1e-5


def test_resume_under_two_processes(ddp_runs):
    """Resuming the two-process run from its step-2 checkpoint with two processes ends bit-identical."""
    tmp, _ = ddp_runs
    again = tmp / "two-resumed"
    shutil.copytree(tmp / "two", again)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (again / f).unlink()
    assert (again / "checkpoints" / "step-2" / "rng_state_1.pt").exists()  # each process's RNG is saved
    cfg = yaml.safe_load((tmp / "two.yaml").read_text())
    cfg_path = write_cfg(tmp / "resume.yaml", **{**cfg, "output_dir": str(again)})
    ran = launch(cfg_path, 2, "--resume")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "at step 2" in ran.stderr
    a, b = load_file(tmp / "two" / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# sample packing


def per_example_losses(model, examples, packed: bool) -> list[float]:
    """Mean target-token loss of each example, from one packed row or from each example alone."""
    if not packed:
        out = []
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(e.labels[1:])
            out.append(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).item())
        return out
    batch = collate_packed([examples], pad_id=0)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0].float()
    out, at = [], 0
    for e in examples:
        n = len(e.input_ids)
        seg_logits, seg_labels = logits[at : at + n - 1], batch["labels"][0, at + 1 : at + n]
        out.append(F.cross_entropy(seg_logits, seg_labels, ignore_index=IGNORE_INDEX).item())
        at += n
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox"])
def test_packed_losses_equal_unpacked_and_examples_are_isolated(model_factory, tokenizer, arch):
    cfg = load_config(
        None, base_model=str(model_factory(arch)), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32"
    )
    model = load_base_model(cfg, torch.device("cpu"))
    rows = [Row("r", {"prompt": f"p{i}: " + "x" * i, "completion": "abc"[: i % 3 + 1]}) for i in range(4)]
    examples = [tokenize_row(r, "completion", tokenizer, False) for r in rows]
    with torch.no_grad():
        check_packing_isolation(model, torch.device("cpu"), len(tokenizer), Precision("cpu", torch.float32))
        alone = per_example_losses(model, examples, packed=False)
        together = per_example_losses(model, examples, packed=True)
        torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-4, rtol=0)
        # perturbing example 1 leaves the logits of every other example unchanged
        batch = collate_packed([examples], pad_id=0)
        before = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        ids = batch["input_ids"].clone()
        start = len(examples[0].input_ids)
        ids[0, start : start + len(examples[1].input_ids)] = torch.randint(6, 60, (len(examples[1].input_ids),))
        after = model(input_ids=ids, position_ids=batch["position_ids"]).logits[0]
    untouched = [i for i in range(before.shape[0]) if not start <= i < start + len(examples[1].input_ids)]
    torch.testing.assert_close(after[untouched], before[untouched], atol=1e-5, rtol=0)
    assert (after[start : start + 3] - before[start : start + 3]).abs().max() > 1e-3


def test_packing_is_refused_where_attention_would_leak(model_factory):
    # OPT derives positions from the attention mask, not position ids: packed examples would see each other
    cfg = load_config(
        None, base_model=str(model_factory("opt")), datasets=[{"path": "x"}], bnb_4bit_compute_dtype="float32"
    )
    model = load_base_model(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="sample_packing: OPTForCausalLM .* lets packed examples attend"):
        check_packing_isolation(model, torch.device("cpu"), 90, Precision("cpu", torch.float32))


def test_pack_examples_fits_rows_and_keeps_every_example(tokenizer):
    rows = [Row("r", {"text": "y" * n}) for n in (30, 5, 17, 60, 2, 44, 9)]
    examples = [tokenize_row(r, "text", tokenizer, False) for r in rows]
    packs = pack_examples(examples, 64)
    assert sorted(i for p in packs for i in p) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in p) <= 64 for p in packs)
    assert len(packs) == 3 and packing_efficiency(examples, packs, 64) > 0.9


def test_packed_training_runs_and_reports_efficiency(tmp_path, llama_dir):
    from rich.console import Console

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(64, seed=7))
    console = Console(record=True, width=200)
    cfg = make_config(
        llama_dir,
        data,
        tmp_path / "run",
        sample_packing=True,
        sequence_len=128,
        micro_batch_size=2,
        max_steps=8,
        learning_rate=1e-2,
        lora_target_modules="all-linear",
    )
    result = run_train(cfg, console=console)
    text = console.export_text()
    assert "sample packing: 64 examples in" in text and "efficiency" in text
    losses = [r["loss"] for r in result.history if r["type"] == "train"]
    assert losses[-1] < losses[0]


def test_float_quant_storage_for_fsdp_gives_the_same_model(llama_dir):
    """FSDP-QLoRA stores packed 4-bit weights in a float tensor; the numbers must not change."""
    outs = []
    for storage in ("uint8", "bfloat16"):
        cfg = load_config(
            None,
            base_model=str(llama_dir),
            datasets=[{"path": "x"}],
            bnb_4bit_compute_dtype="float32",
            bnb_4bit_quant_storage=storage,
        )
        model = load_base_model(cfg, torch.device("cpu"))
        weight = model.model.layers[0].self_attn.q_proj.weight
        assert weight.dtype == getattr(torch, storage)
        with torch.no_grad():
            outs.append(model(input_ids=torch.arange(5, 25).unsqueeze(0)).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_the_shipped_accelerate_config_is_a_plain_multi_gpu_launch():
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "multi_gpu.yaml").read_text())
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["mixed_precision"] == "no"  # FSDP is qlora's `fsdp: true`
