# The two front-door commands: `make demo` trains, `make test` runs the suite.
# Each creates .venv and installs the pinned dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-ci.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# The default tiny model on 8 local CPU ranks (dp=2 x tp=2 x pp=2, 1F1B, ZeRO-1), the built-in corpus.
demo: $(STAMP)
	$(BIN)/meshpar train --model tiny --dp 2 --tp 2 --pp 2 --zero 1 --schedule 1f1b --micro-batch-size 4 --steps 120 --metrics-file runs/demo/metrics.jsonl

# The quick suite (slow tests excluded); `make test-all` includes them.
test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/zero_vs_torch.py
	$(BIN)/python benchmarks/tp_vs_torch.py
	$(BIN)/python benchmarks/activation_memory.py
	$(BIN)/python benchmarks/pp_vs_torch.py
	$(BIN)/python benchmarks/long_context.py
	$(BIN)/python benchmarks/comm.py
	$(BIN)/python benchmarks/checkpoint.py
	$(BIN)/python benchmarks/compression_training.py --out runs/bench/compression.png
	$(BIN)/python benchmarks/gpu_step.py --rounds 3
	$(BIN)/python benchmarks/init_memory.py
	$(BIN)/python benchmarks/large_model.py
	$(BIN)/python benchmarks/prepare_data.py
	$(BIN)/python benchmarks/hf_vs_native.py

clean:
	rm -rf $(VENV) runs .pytest_cache
