# Two commands set everything up on a fresh machine: `make demo` and `make test`;
# `make ui` then serves the MLflow UI on the local store.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo ui test clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first, so nothing pulls a CUDA build; a machine that already has torch keeps it
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	@# PYTHONWARNINGS: setuptools' notice about editable installs is not for the user
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@$(VENV)/bin/gatelab demo

ui: $(STAMP)
	@$(VENV)/bin/gatelab ui

test: $(STAMP)
	$(PY) -m pytest
