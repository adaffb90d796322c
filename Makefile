# ppinfer: `make run` sets everything up and generates text; `make test` runs the linter and the suite.
#
# The virtual environment is created on first use. torch is installed only when the venv
# has none: TORCH_SPEC defaults to the CPU build pinned for these machines; a GPU user
# installs their own torch into .venv first (or passes TORCH_SPEC='torch==X.Y.Z').
# Install also compiles the CPU block kernels; where that fails (no C++ compiler, say) it says
# why and goes on: quantized models then run on dequantized weights.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 4
ARGS ?=

.PHONY: install model run serve lint test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	-$(BIN)/python -m ppinfer.kernels.build
	touch $@

install: $(VENV)/.installed

model: install
	$(BIN)/python -m ppinfer.hub

run: model
	$(BIN)/torchrun --nproc_per_node=$(NPROC) launch/infer.py $(ARGS)

serve: model
	$(BIN)/torchrun --nproc_per_node=$(NPROC) launch/serve.py $(ARGS)

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: model
	$(BIN)/python -m ppinfer.bench $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
