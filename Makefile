# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-quick test test-fast bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distill run configs/shapes/pipeline.yaml

demo-quick: $(STAMP)
	$(BIN)/distill run configs/shapes/pipeline.yaml --quick

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

DEVICE ?= cpu
bench: $(STAMP)
	$(BIN)/python bench/run_all.py --device $(DEVICE)

clean:
	rm -rf $(VENV) runs
