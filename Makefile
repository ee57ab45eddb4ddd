# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test gpu-test gpu-check benchmark clean

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Trains the tiny CNN on the embedded texture photos (shipped inside scikit-image) and prints
# per-epoch metrics and the test result.
demo: $(STAMP)
	$(BIN)/msdali train --config pipelines/cpu_smoke.toml --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest

gpu-test: $(STAMP)
	$(BIN)/python -m pytest -m gpu

# On a CUDA machine: the gpu tests, a CUDA AMP training step, CUDA step memory and the benchmark,
# into one JSON naming the device (parts that need DALI are skipped where it is not installed).
# No install step: a GPU box (an NGC container, a cluster node) already has a CUDA torch and often no
# network, so the package runs from this checkout with the venv's python if there is one, else python3.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m multiscale_dali.benchmark.gpu_check --out gpu-check.json

benchmark: $(STAMP)
	$(BIN)/msdali benchmark

clean:
	rm -rf $(VENV) build *.egg-info
