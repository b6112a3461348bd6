# The user's interface: `make serve` and `make test` work from a fresh clone with nothing installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS_DIR := stable_diffusion/models

.PHONY: install demo-models serve test lint clean-demo

install: $(STAMP)

# Reinstall when the dependency list changes. torch + torchvision come from the registry as a matching pair.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo-models: $(STAMP)
	$(BIN)/diffusion-api demo-models

# Starts the service on 127.0.0.1:8000 in the foreground (Ctrl-C stops it).
serve: $(STAMP)
	@if [ -z "$$(ls -A $(MODELS_DIR) | grep -v '^README.md$$')" ]; then $(BIN)/diffusion-api demo-models; fi
	$(BIN)/diffusion-api serve

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
