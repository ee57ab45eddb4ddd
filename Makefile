# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test gpu-test benchmark clean

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

benchmark: $(STAMP)
	$(BIN)/msdali benchmark

clean:
	rm -rf $(VENV) build *.egg-info
