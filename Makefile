# Quick start: `make demo` runs the reference model, `make test` runs the checks and the tests.
# Both create .venv and install moeserve into it on first use.
VENV ?= .venv
PYTHON ?= python3
# torch is installed first and pinned: on the project's machines 2.13.0 is the CPU build on disk;
# set TORCH_SPEC (for example TORCH_SPEC="torch==2.13.0 --index-url <your CPU wheel index>") to change it.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.moeserve-installed

.PHONY: install demo test lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moeserve generate --prompt "def read_config(path):" --max-new-tokens 64 --routing

lint: $(STAMP)
	$(BIN)/ruff check src tests

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
