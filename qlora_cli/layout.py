"""The name of every file and folder qlora reads or writes, in one place (``run_folder`` reads and classifies them).

<run>/                          what ``qlora train`` writes
    qlora_config.yaml           the resolved config            CONFIG_FILE
    metrics.jsonl               one record per log, eval, end  METRICS_FILE
    adapter_model.safetensors   the adapter, PEFT's format     ADAPTER_WEIGHTS
    adapter_config.json                                        ADAPTER_CONFIG
    tokenizer.json, ...         the tokenizer used             TOKENIZER_FILES
    README.md, loss.png         model card and curves          CARD_FILE, PLOT_FILE
    trackers.json               W&B / MLflow run ids           TRACKERS_FILE
    best/                       save_best: adapter + best_eval.json        BEST_DIR, BEST_FILE
    checkpoints/step-N/         adapter, optimizer.pt, scheduler.pt, rng_state*.pt, trainer_state.json,
                                COMPLETE (written last)        CHECKPOINTS_DIR, ...
<model>/                        a transformers model folder: config.json, model.safetensors (or shards)
<cache>/gguf/<name>/            a converted GGUF base, with manifest.json written last
"""

from __future__ import annotations

# a run folder
CONFIG_FILE = "qlora_config.yaml"
METRICS_FILE = "metrics.jsonl"
CARD_FILE = "README.md"
PLOT_FILE = "loss.png"
TRACKERS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"  # `tensorboard --logdir runs/` finds every run
BEST_DIR = "best"
BEST_FILE = "best_eval.json"
CHECKPOINTS_DIR = "checkpoints"

# an adapter (PEFT's names)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# a checkpoint (checkpoints/step-N)
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"

# a model folder, and the tokenizer files that make a folder a tokenizer
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG, "tokenizer.model")

# a converted GGUF base in the cache
MANIFEST = "manifest.json"


def rng_file(rank: int) -> str:
    """A checkpoint's RNG state of process ``rank``."""
    return "rng_state.pt" if rank == 0 else f"rng_state_{rank}.pt"
