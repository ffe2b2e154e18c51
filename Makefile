PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install native run demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The hot path compiled with mypyc (see streams/native.py); plain Python if that fails.
NATIVE := build/native/.built
$(NATIVE): $(STAMP) $(wildcard schemas/*.py agents/*.py streams/*.py)
	@mkdir -p build/native
	@if $(BIN)/python -m streams.native build > build/native/build.log 2>&1; then \
		echo "hot path compiled with mypyc"; \
	else \
		echo "warning: mypyc build failed (see build/native/build.log); running as plain Python"; \
	fi
	@touch $(NATIVE)

native: $(NATIVE)

## The main job on the embedded default: broker + worker + web views + demo load.
run: $(NATIVE)
	$(BIN)/blackroad up --demo

## The whole test suite against a real (embedded) broker.
test: $(NATIVE)
	$(BIN)/pytest -q

## Throughput and latency against the baselines (installs the bench extra).
bench: $(NATIVE)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/blackroad bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy streams agents schemas

clean:
	test ! -x $(BIN)/python || $(BIN)/python -m streams.native clean
	rm -rf $(VENV) build data .pytest_cache .mypy_cache .ruff_cache
