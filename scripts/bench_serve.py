"""Generation throughput with many adapters in one batch: qlora's MultiLoRA engine vs PEFT, side by side.

For one 4-bit (NF4) base and 8 random LoRA adapters (rank 16, all linear layers), decode a batch of 8 prompts
(a) all for one adapter and (b) each for a different adapter, with qlora's engine (``qlora serve``'s) and
with PEFT's mixed-batch inference (``PeftModel.generate(..., adapter_names=[...])``), greedy, with a KV
cache, every row generating exactly ``--new-tokens`` tokens. Prints tokens/s and the ratios; the last line is

    multi_vs_single=X.XX multi_vs_peft=Y.YY

multi_vs_single: ours with 8 adapters / ours with 1 adapter (target >= 0.7)
multi_vs_peft:   ours with 8 adapters / PEFT with 8 adapters (target >= 1.5)

    python scripts/bench_serve.py                       # small random llama on CPU (a few minutes)
    python scripts/bench_serve.py --device cuda --hidden 2048 --layers 16 --new-tokens 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_cli.config import LoRASettings, ModelSettings, QuantSettings  # noqa: E402
from qlora_cli.model.adapter_io import save_adapter  # noqa: E402
from qlora_cli.model.loading import DTYPES, load_base_model, load_tokenizer, quiet_libraries  # noqa: E402
from qlora_cli.model.lora import inject_lora, lora_layers  # noqa: E402
from qlora_cli.serving.engine import Engine, Generation, SamplingParams  # noqa: E402
from qlora_cli.serving.multi_lora import MultiLoRA  # noqa: E402
from qlora_cli.testing.tiny import build_tiny_model  # noqa: E402


def make_adapters(base: Path, settings: ModelSettings, out: Path, n: int, r: int) -> list[Path]:
    """``n`` random adapters (A and B random: a zero B would make every adapter the base)."""
    model = load_base_model(settings, torch.device("cpu"))
    lora = LoRASettings(r=r, alpha=2.0 * r, dropout=0.0, target_modules="all-linear", use_rslora=False)
    inject_lora(model, lora)
    folders = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.05)
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
        folder = out / f"adapter{i}"
        save_adapter(model, folder, lora, str(base))
        folders.append(folder)
    return folders


def prompts(tok, batch: int, length: int) -> list[list[int]]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    out = []
    for i in range(batch):
        text = " ".join(words[(i + j) % len(words)] for j in range(length))
        out.append(list(tok(text)["input_ids"])[:length])
    return out


def timed(fns: dict, repeats: int, sync, clock) -> dict[str, float]:
    """Median seconds of each function, run in interleaved rounds after one warm-up each (so a change in the
    machine's load hits every configuration alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync()
            t = clock()
            fn()
            sync()
            times[key].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype of the 4-bit base")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    ap.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: this process's CPU time (a shared CPU box)"
    )
    ap.add_argument("--profile", action="store_true", help="print the op profile of one mixed batch, each stack")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_libraries()
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = DTYPES[args.dtype]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base = build_tiny_model(
        tmp / "base", "llama", hidden=args.hidden, layers=args.layers, heads=max(4, args.hidden // 64),
        kv_heads=max(2, args.hidden // 256), intermediate=int(args.hidden * 8 / 3) // 64 * 64,
        max_positions=args.prompt_len + args.new_tokens + 8, initializer_range=0.1,
    )  # fmt: skip
    settings = ModelSettings(str(base), quant=QuantSettings(compute_dtype=args.dtype))
    folders = make_adapters(base, settings, tmp, args.adapters, args.rank)
    tok = load_tokenizer(settings)
    ids = prompts(tok, args.batch, args.prompt_len)
    single = [0] * args.batch
    mixed = [i % args.adapters for i in range(args.batch)]
    n_tokens = args.batch * args.new_tokens

    # -- ours: one base, every adapter in MultiLoRA, the serve engine ------------------------------
    model = load_base_model(settings, device)
    multi = MultiLoRA(model)
    slots = [multi.load(f"a{i}", f).slot for i, f in enumerate(folders)]
    engine = Engine(model, multi, max_batch_size=args.batch, compute_dtype=dtype)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)

    def ours(which: list[int]) -> list[list[int]]:
        seqs = [Generation(p, tok, params, slots[w]) for p, w in zip(ids, which)]
        engine.run(seqs)
        assert all(len(s.output_ids) == args.new_tokens for s in seqs)
        return [s.output_ids for s in seqs]

    ours_tokens = ours(mixed)

    # -- PEFT: the same base and adapters, mixed batches through adapter_names ----------------------
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    hf = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=dtype, device_map={"": device})
    for m in hf.modules():  # as qlora's loader does on CPU (see model.disable_cpu_weight_repacking)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    pm = PeftModel.from_pretrained(hf, folders[0], adapter_name="a0")
    for i, f in enumerate(folders[1:], start=1):
        pm.load_adapter(f, adapter_name=f"a{i}")
    pm.eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS may be generated but does not stop a row
    T = args.prompt_len
    input_ids = torch.tensor([[0] * (T - len(p)) + p for p in ids], device=device)
    attention = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ids], device=device)

    def peft_generate(which: list[int]) -> list[list[int]]:
        with torch.inference_mode():
            out = pm.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=args.new_tokens, do_sample=False,
                use_cache=True, pad_token_id=tok.pad_token_id,
                adapter_names=[f"a{w}" for w in which],
            )  # fmt: skip
        return out[:, T:].tolist()

    peft_tokens = peft_generate(mixed)

    if args.profile:
        from torch.profiler import profile

        for name, fn in (("ours", lambda: ours(mixed)), ("peft", lambda: peft_generate(mixed))):
            with profile() as prof:
                fn()
            print(f"-- {name}, one mixed batch")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    fns = {
        "ours_single": lambda: ours(single),
        "ours_multi": lambda: ours(mixed),
        "peft_single": lambda: peft_generate(single),
        "peft_multi": lambda: peft_generate(mixed),
    }
    results = {k: n_tokens / v for k, v in timed(fns, args.repeats, sync, clock).items()}
    agree = sum(a == b for a, b in zip(ours_tokens, peft_tokens)) / len(ours_tokens)

    # -- report ---------------------------------------------------------------------------------------
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(
        f"# {time.strftime('%Y-%m-%d')}  {hw}, {torch.get_num_threads()} threads  torch {torch.__version__}  "
        f"transformers {transformers.__version__}  peft {peft.__version__}"
    )
    print(
        f"# llama hidden={args.hidden} layers={args.layers}, NF4 base, compute {args.dtype}; {args.adapters} "
        f"adapters r={args.rank} all-linear; batch {args.batch} x {args.prompt_len} prompt tokens + "
        f"{args.new_tokens} new tokens, greedy; median of {args.repeats} interleaved rounds, {args.clock} clock"
    )
    for key, value in results.items():
        print(f"{key:12s} {value:10.1f} tokens/s")
    print(f"identical greedy tokens, ours vs PEFT (mixed batch): {agree:.0%} of rows")
    multi_vs_single = results["ours_multi"] / results["ours_single"]
    multi_vs_peft = results["ours_multi"] / results["peft_multi"]
    peft_ratio = results["peft_multi"] / results["peft_single"]
    print(f"peft: multi_vs_single={peft_ratio:.2f}")
    print(f"multi_vs_single={multi_vs_single:.2f} multi_vs_peft={multi_vs_peft:.2f}")


if __name__ == "__main__":
    main()
