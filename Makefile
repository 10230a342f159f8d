# learnloop: one command to serve, one to test. Both install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install install-llamacpp serve test test-fast check bench-serve bench-learning clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# exact pin: torch 2.13.0 is the CPU build; a looser pin pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

install-llamacpp: install  ## llama-cpp-python[server] (builds once, ~6 min; pip's wheel cache reuses it after)
	$(BIN)/pip install --quiet -e '.[llamacpp]'

serve: install            ## start the chat server on the default model (pulled on first use)
	$(BIN)/learnloop serve

test: install             ## every test, the slow end-to-end one with SmolLM2-135M included
	$(BIN)/pytest

test-fast: install        ## everything but the slow tests
	$(BIN)/pytest -m "not slow"

check: install            ## lint, format and types
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench-serve: install      ## single-stream and concurrent decode through the real gateway
	$(BIN)/python bench/serve.py

bench-learning: install  ## the simulated shop: satisfaction by version over 3 training cycles (about 15 min)
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python bench/learning.py

clean:
	rm -rf $(VENV) learnloop-data .pytest_cache .mypy_cache .ruff_cache
