PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default: broker + worker + web views + demo load.
run: $(STAMP)
	$(BIN)/blackroad up --demo

## The whole test suite against a real (embedded) broker.
test: $(STAMP)
	$(BIN)/pytest -q

## Throughput and latency against the baselines (installs the bench extra).
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/blackroad bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy streams agents schemas

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
