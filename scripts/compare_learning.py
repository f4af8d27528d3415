"""Learning fidelity: does `qlora train` learn as well as Hugging Face PEFT + bitsandbytes?

For each architecture, a tiny random model (2 layers, hidden 128, character tokenizer) learns a copy task
(`{"prompt": "Q:abc?A:", "completion": "abc"}`) on an NF4 base with both stacks, for several seeds, and the
greedy exact match on held-out words is reported side by side (mean and spread over seeds).

- qlora: `qlora_cli.train.loop.run_train` on a RunConfig, exactly what `qlora train` runs.
- PEFT: transformers + BitsAndBytesConfig, `prepare_model_for_kbit_training`, `get_peft_model`, a plain loop
  (the model's own loss, backward, clip, bitsandbytes' paged 8-bit AdamW), over the same tokenized examples
  in the same order (qlora's `epoch_batches` for the seed), with the same hyperparameters.

Both adapters are scored by one function (qlora's greedy `score_generations`) on the model each stack trained.

    python scripts/compare_learning.py --arch gpt2 --seeds 0 1 2
    python scripts/compare_learning.py --arch all --seeds 0 1 --steps 150
    python scripts/compare_learning.py --arch gpt2 --seeds 0 --set fused_lora=false --set lora_dropout=0
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


LETTERS = "abcdefghijklmnopqrstuvwxyz"
ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2", "gpt_neox", "opt")  # what tiny builds


def write_task(folder: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Copy task: random 3-7 letter words; held-out words never appear in training."""
    rng = random.Random(1234)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n_train + n_eval:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    paths = []
    for name, part in (("train", words[:n_train]), ("eval", words[n_train:])):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"prompt": f"Q:{w}?A:", "completion": w}) + "\n" for w in part))
        paths.append(p)
    return paths[0], paths[1]


def qlora_config(args: argparse.Namespace, base: Path, data: Path, out: Path, seed: int) -> Any:
    from qlora_cli.config import load_config

    return load_config(
        None,
        overrides=args.set,
        base_model=str(base),
        datasets=[{"path": str(data), "type": "completion"}],
        lora_r=16,
        lora_alpha=32,
        lora_dropout=args.lora_dropout,
        lora_target_modules="all-linear",
        bnb_4bit_compute_dtype=args.dtype,
        learning_rate=args.lr,
        lr_scheduler="constant",
        micro_batch_size=args.batch,
        max_steps=args.steps,
        optimizer="paged_adamw_8bit",
        max_grad_norm=1.0,
        seed=seed,
        logging_steps=10,  # train_loss: the mean over the last 10 steps, as reported for PEFT
        gradient_checkpointing=False,  # the same gradients either way (tested); faster at this size
        output_dir=str(out),
        device="cpu",
    )


def score(model: Any, tokenizer: Any, eval_path: Path, dtype: str) -> float:
    from qlora_cli.data.pipeline import read_rows
    from qlora_cli.scoring import generation_case, score_generations
    from qlora_cli.train.step import Precision

    cases = [generation_case(r, "completion", tokenizer) for r in read_rows(_spec(eval_path))]
    autocast = Precision.for_run(dtype, torch.device("cpu")).autocast
    return score_generations(model, tokenizer, cases, max_new_tokens=12, batch_size=64, autocast=autocast).exact_match


def _spec(path: Path) -> Any:
    from qlora_cli.config import DatasetSpec

    return DatasetSpec(path=str(path), type="completion")


def run_qlora(args: argparse.Namespace, base: Path, data: Path, eval_path: Path, out: Path, seed: int) -> dict:
    from rich.console import Console

    from qlora_cli.model.adapter_io import load_adapter
    from qlora_cli.model.loading import load_base_model, load_tokenizer
    from qlora_cli.model.lora import lora_layers
    from qlora_cli.train.loop import run_train

    cfg = qlora_config(args, base, data, out, seed)
    t0 = time.perf_counter()
    result = run_train(cfg, force=True, console=Console(quiet=True))
    secs = time.perf_counter() - t0
    model = load_base_model(cfg, torch.device("cpu"))
    load_adapter(model, out)
    for _, layer in lora_layers(model):
        layer.fused = cfg.fused_lora
    em = score(model, load_tokenizer(cfg), eval_path, args.dtype)
    return {"exact_match": em, "train_loss": result.train_loss, "seconds": secs}


def run_peft(args: argparse.Namespace, base: Path, data: Path, eval_path: Path, out: Path, seed: int) -> dict:
    """The reference: what a user of transformers + PEFT + bitsandbytes writes, on qlora's batches."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_cli.data.pipeline import build_datasets, collate, epoch_batches
    from qlora_cli.model.loading import DTYPES, disable_cpu_weight_repacking, load_tokenizer

    cfg = qlora_config(args, base, data, out, seed)  # the same data settings and tokenizer
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(cfg)
    examples = build_datasets(cfg.data, tokenizer).train
    dtype = DTYPES[args.dtype]
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=dtype, device_map={"": "cpu"})
    model.config.use_cache = False
    disable_cpu_weight_repacking(model)  # bitsandbytes' CPU eval kernel would stop gradients (see model/loading.py)
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=bool(cfg.gradient_checkpointing),  # as qlora does for this config
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=args.lr, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    t0 = time.perf_counter()
    step, epoch, losses = 0, 0, []
    while step < args.steps:
        for idx in epoch_batches(len(examples), args.batch, seed, epoch):
            batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
            batch.pop("token_mask", None)
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step == args.steps:
                break
        epoch += 1
    secs = time.perf_counter() - t0
    em = score(model, tokenizer, eval_path, args.dtype)
    return {"exact_match": em, "train_loss": statistics.fmean(losses[-10:]), "seconds": secs}


STACKS = {"qlora": run_qlora, "peft": run_peft}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["gpt2"], help=f"{', '.join(ARCHITECTURES)} or all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--init-range", type=float, default=0.1, help="initializer_range of the random base")
    parser.add_argument("--train-words", type=int, default=2000)
    parser.add_argument("--eval-words", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared 2-core machine: 1)")
    parser.add_argument("--set", action="append", default=[], help="qlora config override, key=value")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    archs = list(ARCHITECTURES) if args.arch == ["all"] else args.arch

    from qlora_cli.model.loading import quiet_libraries
    from qlora_cli.testing.tiny import build_tiny_model

    quiet_libraries()
    torch.set_num_threads(args.threads)
    work_ctx = tempfile.TemporaryDirectory() if args.workdir is None else nullcontext(str(args.workdir))
    results: dict[str, dict[str, list[dict]]] = {}
    with work_ctx as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        train_path, eval_path = write_task(work, args.train_words, args.eval_words)
        for arch in archs:
            base = work / f"base-{arch}-{args.init_range:g}"
            if not (base / "config.json").exists():
                build_tiny_model(
                    base, arch, seed=0, hidden=128, layers=2, heads=4, kv_heads=4, initializer_range=args.init_range
                )
            results[arch] = {s: [] for s in args.stacks}
            for seed in args.seeds:
                for stack in args.stacks:
                    r = STACKS[stack](args, base, train_path, eval_path, work / f"{arch}-{stack}-{seed}", seed)
                    results[arch][stack].append(r)
                    print(
                        f"{arch:9s} seed {seed} {stack:6s} exact match {r['exact_match']:.3f}  "
                        f"final train loss {r['train_loss']:.3f}  {r['seconds']:.0f}s",
                        flush=True,
                    )
    print()
    print(f"| architecture | {' | '.join(args.stacks)} |")
    print(f"| --- | {' | '.join('---' for _ in args.stacks)} |")
    for arch, by_stack in results.items():
        cells = []
        for stack in args.stacks:
            ems = [r["exact_match"] for r in by_stack[stack]]
            spread = f"{min(ems):.3f}-{max(ems):.3f}" if len(ems) > 1 else ""
            cells.append(f"{statistics.fmean(ems):.3f} ({spread})" if spread else f"{ems[0]:.3f}")
        print(f"| {arch} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
