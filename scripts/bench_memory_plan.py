"""How close is `qlora inspect`'s memory plan to what training really allocates?

    python scripts/bench_memory_plan.py                 # CPU: plan vs measured run_train() runs, + an 8B-shaped plan
    python scripts/bench_memory_plan.py --device cuda   # GPU: plan vs torch.cuda.max_memory_allocated
    python scripts/bench_memory_plan.py --json out.json

Each case builds a small random model in code (nothing is downloaded), writes full-length text rows (every
micro-batch is exactly sequence_len tokens, the case the plan describes), predicts the peak with
``memory_plan.plan_memory`` and then runs the real ``train.loop.run_train`` for 3 steps and measures it:

- CPU: ``testing.measure.measure_training_peak``: the model's resident tensor bytes when training starts plus the
  peak of torch's CPU allocator (``torch.profiler`` memory events) over the rest of the run.
- CUDA: ``torch.cuda.max_memory_allocated()`` over the whole run (weights included, as they load to the GPU);
  the cases use unpaged optimizers there, whose state is in torch's allocator (paged state is not counted by
  it). The plan's GPU total adds the CUDA context and the allocator reserve, compared with
  ``max_memory_reserved`` + the context.

It also times the plan of a Llama-3.1-8B-shaped config (config.json only).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_cli.config import load_config  # noqa: E402
from qlora_cli.memory_plan import plan_memory  # noqa: E402
from qlora_cli.memory_plan.sizes import format_bytes  # noqa: E402
from qlora_cli.model.loading import quiet_libraries  # noqa: E402
from qlora_cli.testing.measure import measure_training_peak  # noqa: E402
from qlora_cli.testing.tiny import build_char_tokenizer, save_llama_8b_shapes  # noqa: E402

PLAIN = dict(fused_lora=False, fused_cross_entropy=False)  # the reference paths; the default is fused
CASES = [
    # name, architecture, settings (on top of: all-linear r=16, no dropout, no checkpointing)
    ("llama fp32 plain adamw", "llama", dict(bnb_4bit_compute_dtype="float32", optimizer="adamw_torch", **PLAIN)),
    ("llama fp32 fused adamw", "llama", dict(bnb_4bit_compute_dtype="float32", optimizer="adamw_torch")),
    (
        "llama bf16 fused ckpt 8bit drop",
        "llama",
        dict(bnb_4bit_compute_dtype="bfloat16", gradient_checkpointing=True, optimizer="adamw_8bit", lora_dropout=0.05),
    ),
    (
        "llama bf16 plain ckpt 8bit drop",
        "llama",
        dict(
            bnb_4bit_compute_dtype="bfloat16",
            gradient_checkpointing=True,
            optimizer="adamw_8bit",
            lora_dropout=0.05,
            **PLAIN,
        ),
    ),
    (
        "llama fp32 accum2 eval ckpt",
        "llama",
        dict(
            bnb_4bit_compute_dtype="float32",
            gradient_checkpointing=True,
            gradient_accumulation_steps=2,
            val_set_size=0.2,
            optimizer="paged_adamw_32bit",
        ),
    ),
    ("gpt2 bf16 8bit drop", "gpt2", dict(bnb_4bit_compute_dtype="bfloat16", optimizer="adamw_8bit", lora_dropout=0.05)),
    (
        "qwen2 bf16 r64 q,v",
        "qwen2",
        dict(bnb_4bit_compute_dtype="bfloat16", lora_r=64, lora_target_modules=["q_proj", "v_proj"]),
    ),
]


def build_model(folder: Path, arch: str) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    if (folder / "config.json").exists():
        return folder
    tok = build_char_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llama_like = dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **ids,
    )
    if arch == "llama":
        config = LlamaConfig(**llama_like)
    elif arch == "qwen2":
        config = Qwen2Config(**llama_like)
    else:
        config = GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=1024, vocab_size=32000, **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def case_config(model: Path, data: Path, out: Path, device: str, settings: dict, batch: int, seq: int):
    fields = dict(
        base_model=str(model),
        datasets=[{"path": str(data), "type": "text"}],
        sequence_len=seq,
        micro_batch_size=batch,
        max_steps=3,
        logging_steps=1,
        lora_target_modules="all-linear",
        lora_dropout=0.0,
        gradient_checkpointing=False,
        device=device,
        output_dir=str(out),
    )
    fields.update(settings)
    if device == "cuda" and fields.get("optimizer", "paged_adamw_8bit").startswith("paged"):
        fields["optimizer"] = fields["optimizer"].removeprefix("paged_")  # paged state is outside torch's allocator
    return load_config(None, **fields)


def measure_cuda(cfg) -> dict[str, int]:
    from rich.console import Console

    from qlora_cli.train.loop import run_train

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run_train(cfg, force=True, console=Console(quiet=True))
    return {"tensor_peak": torch.cuda.max_memory_allocated(), "reserved_peak": torch.cuda.max_memory_reserved()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    quiet_libraries()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = random.Random(0)
        data = tmp / "text.jsonl"
        rows = ["".join(rng.choice("abcdefgh ") for _ in range(2 * args.seq)) for _ in range(5 * args.batch)]
        data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        print(f"{'case':32s} {'plan':>12s} {'measured':>12s} {'error':>8s} {'plan time':>10s}")
        for name, arch, settings in CASES:
            model = build_model(tmp / arch, arch)
            cfg = case_config(model, data, tmp / "run", args.device, settings, args.batch, args.seq)
            t0 = time.perf_counter()
            plan = plan_memory(cfg, device_type=args.device)
            plan_sec = time.perf_counter() - t0
            measured = measure_training_peak(cfg) if args.device == "cpu" else measure_cuda(cfg)
            error = (plan.tensor_peak - measured["tensor_peak"]) / measured["tensor_peak"]
            row = {
                "case": name,
                "plan_tensor_peak": plan.tensor_peak,
                "measured_tensor_peak": measured["tensor_peak"],
                "error": error,
                "plan_sec": plan_sec,
                "plan_total": plan.total,
            }
            if args.device == "cuda":
                row["measured_reserved_peak"] = measured["reserved_peak"]
            results.append(row)
            print(
                f"{name:32s} {format_bytes(plan.tensor_peak):>12s} {format_bytes(measured['tensor_peak']):>12s} "
                f"{100 * error:+7.3f}% {plan_sec:9.1f}s"
            )
        # the done-criterion: a real-shaped plan in seconds
        big = save_llama_8b_shapes(tmp / "llama-3.1-8b-shapes")
        cfg = load_config(
            None,
            base_model=str(big),
            datasets=[{"path": str(data), "type": "text"}],
            bnb_4bit_compute_dtype="bfloat16",
            lora_target_modules="all-linear",
            sequence_len=2048,
            micro_batch_size=2,
            gradient_accumulation_steps=8,
            gradient_checkpointing=True,
        )
        t0 = time.perf_counter()
        plan = plan_memory(cfg, device_type="cuda", gpu_memory=24 * 2**30)
        sec = time.perf_counter() - t0
        print(
            f"\nLlama-3.1-8B shapes, one GPU, r=16 all-linear, 2 x 2048, checkpointing: tensor peak "
            f"{format_bytes(plan.tensor_peak)}, total {format_bytes(plan.total)}, largest micro-batch on 24 GiB "
            f"{plan.max_micro_batch_size}; planned in {sec:.1f}s"
        )
        results.append({"case": "llama-3.1-8b-shapes plan", "plan_total": plan.total, "plan_sec": sec})
    meta = {
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
