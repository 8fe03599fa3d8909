# The README's commands. `make demo` and `make test` install first when .venv/ is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command: the CPU build of 2.13.0 instead of a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"

demo: | $(BIN)/python
	$(BIN)/python bench/imbalance.py --quick --out runs/demo
	$(BIN)/brats-cggm phantom --out runs/demo/phantoms --cases 3 --size 96 --seed 0
	$(BIN)/brats-cggm check runs/demo/phantoms

test: | $(BIN)/python
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: | $(BIN)/python
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: | $(BIN)/python
	$(BIN)/python bench/imbalance.py --out bench/results
	$(BIN)/python bench/data_throughput.py --out bench/results/data_throughput.json

clean:
	rm -rf $(VENV) runs .pytest_cache
