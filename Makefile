# learnloop: one command to serve, one to test. Both install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LLAMA  := $(VENV)/.llamacpp
SHELL  := /bin/bash

.PHONY: install install-llamacpp serve test test-fast test-postgresql check bench-serve bench-learning clean

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
	touch $(LLAMA)

# serve's llama.cpp engine: built once with its progress shown (the compile steps of pip -v,
# the whole log in $(VENV)/llamacpp-build.log); where the build fails, serve goes on with the
# transformers engine (model.engine auto logs which engine serves and why)
$(LLAMA): $(STAMP)
	@echo "llama-cpp-python: building once (about 6-11 min on 2 cores; pip's wheel cache reuses the build after)"
	@set -o pipefail; CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -v -e '.[llamacpp]' 2>&1 \
	  | tee $(VENV)/llamacpp-build.log \
	  | { grep --line-buffered -E '^ *\[ *[0-9]+%\]|^Successfully installed|^ERROR' || true; } \
	  || echo "llama-cpp-python could not be installed ($(VENV)/llamacpp-build.log): serving with transformers"
	touch $(LLAMA)

serve: install $(LLAMA)   ## start the chat server on the default model (pulled on first use), llama.cpp engine
	$(BIN)/learnloop serve

test: install             ## every test, the slow end-to-end one with SmolLM2-135M included
	$(BIN)/pytest

test-fast: install        ## everything but the slow tests
	$(BIN)/pytest -m "not slow"

test-postgresql: install  ## the suite again with every store a test opens in PostgreSQL (127.0.0.1:5432; README, "Tests")
	PGTEST_STORE=postgresql $(BIN)/pytest $(PYTEST_ARGS)

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
