# The README's commands. `make demo` and `make test` install first when .venv/ is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command: the CPU build of 2.13.0 instead of a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# `make test` runs on two pytest-xdist workers, one per core of the 2-core reference machine
# (tests/conftest.py: one torch thread per worker, each file whole on one worker, longest files
# first). `make test PYTEST_XDIST=` runs in one process; `PYTEST_XDIST="-n 4 ..."` uses 4 cores.
PYTEST_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install demo test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[train,dev,app,food,raw]"

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[train,dev,app,food,raw]"

# The demo: CGGM on the synthetic imbalance task (~20 s), then BraTS-like phantoms ->
# a short CGGM training on the CPU -> evaluation of the validation cases -> ONNX export ->
# ONNX Runtime segmentation of every phantom with contribution maps (~6 min on 2 cores).
DEMO := runs/demo
# 24 epochs: at 12 the CGGM run found WT and TC but no enhancing tumour (Dice 0.55 / 0.41 / 0.00); at 24
# all three regions (WT 0.68, TC 0.47, ET 0.50 on the validation phantoms), ~2 min of training.
DEMO_TRAIN ?= --epochs 24
demo: | $(BIN)/python
	$(BIN)/python bench/imbalance.py --quick --out $(DEMO)/imbalance
	rm -rf $(DEMO)/phantoms $(DEMO)/brats
	$(BIN)/brats-cggm phantom --out $(DEMO)/phantoms --cases 20 --size 64 --seed 0
	$(BIN)/brats-cggm check $(DEMO)/phantoms
	$(BIN)/brats-cggm train --data $(DEMO)/phantoms --out $(DEMO)/brats --preset cpu-small $(DEMO_TRAIN)
	$(BIN)/brats-cggm evaluate --run $(DEMO)/brats
	$(BIN)/brats-cggm export --run $(DEMO)/brats --out $(DEMO)/model/demo.onnx --description "make demo: 24 epochs on 20 phantoms"
	$(BIN)/brats-cggm predict --model $(DEMO)/model/demo.onnx --input $(DEMO)/phantoms --out $(DEMO)/predictions --contributions --overwrite

test: | $(BIN)/python
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_XDIST) $(PYTEST_ARGS)

test-slow: | $(BIN)/python
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: | $(BIN)/python
	$(BIN)/python bench/imbalance.py --out bench/results
	$(BIN)/python bench/data_throughput.py --out bench/results/data_throughput.json

clean:
	rm -rf $(VENV) runs .pytest_cache
