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
	# crf: pydensecrf2 (a C++ build) for CLIP-ES's dense CRF in the demo; the tests run without it
	$(BIN)/pip install -q -e '.[dev,crf]' || { echo "pydensecrf2 did not build: installing without the crf extra (cam.crf=true will fail)"; $(BIN)/pip install -q -e '.[dev]'; }
	$(BIN)/pip install -q --no-deps lvis==0.5.3
	touch $(STAMP)

# the run, then its results into README.md's results block and docs/results.md, and its stage
# times into the table `distill run` estimates a run's time from
demo: $(STAMP)
	$(BIN)/distill run configs/shapes/pipeline.yaml
	$(BIN)/distill report runs/shapes --readme README.md --results docs/results.md --stage-times distill/pipeline/stage_times.json

demo-quick: $(STAMP)
	$(BIN)/distill run configs/shapes/pipeline.yaml --quick

# one process per core (pytest-xdist), each test on one thread (tests/conftest.py pins it)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not gpu"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not gpu and not slow"

DEVICE ?= cpu
bench: $(STAMP)
	$(BIN)/python bench/run_all.py --device $(DEVICE)

clean:
	rm -rf $(VENV) runs
