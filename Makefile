PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install native kafka chromium run demo test pythons lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) kafka

## The hot path compiled with mypyc (see streams/runtime/native.py); plain Python if that fails.
NATIVE := build/native/.built
$(NATIVE): $(STAMP) $(wildcard schemas/*.py agents/*.py streams/*/*.py)
	@mkdir -p build/native
	@if $(BIN)/python -m streams.runtime.native build > build/native/build.log 2>&1; then \
		echo "hot path compiled with mypyc"; \
	else \
		echo "warning: mypyc build failed (see build/native/build.log); running as plain Python"; \
	fi
	@touch $(NATIVE)

native: $(NATIVE)

## The Apache Kafka engine's jars (engines/kafka/pom.xml), resolved by Maven into ~/.m2 the
## first time and again when the pom changes; a quick check otherwise. Without Java 17+ or
## Maven it says so in one line and the embedded broker is Tansu (streams/engines/).
kafka: $(STAMP)
	@$(BIN)/python -m streams.engines.kafka_jars provision

## The main job on the embedded default: broker + worker + web views + demo load.
run: $(NATIVE) kafka
	$(BIN)/blackroad up --demo

## Headless Chromium (Debian's package) for the dashboard's test, installed once with apt.
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	} || echo "warning: could not install chromium; tests/test_dashboard.py will fail"

## The whole test suite against real (embedded) brokers: Apache Kafka and Tansu.
test: $(NATIVE) kafka chromium
	$(BIN)/pytest -q --durations=25

## Throughput and latency against the baselines (installs the bench extra), on the embedded
## Tansu and Apache Kafka engines (Tansu alone where Kafka cannot start; ARGS="--engine kafka").
bench: $(NATIVE) kafka
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.bench $(ARGS)

## The unit tests and the pipeline on each other supported Python (3.12, 3.13), compiled, on
## Tansu: each in a venv of its own (.venv-3.12, ...). PYTHONS="python3.12" for one.
PYTHONS ?= python3.12 python3.13
pythons:
	@for py in $(PYTHONS); do \
		v=.venv-$${py#python}; \
		test -x $$v/bin/python || $$py -m venv $$v || exit 1; \
		$$v/bin/pip install --quiet -e '.[dev]' || exit 1; \
		$$v/bin/python -m streams.runtime.native build > build/native/build-$$py.log 2>&1 || exit 1; \
		STREAMS_TEST_ENGINES=tansu $$v/bin/pytest -q -p no:cacheprovider tests/test_units.py tests/test_wire.py \
			tests/test_settings.py tests/test_pipeline.py tests/test_retries.py || exit 1; \
	done; $(BIN)/python -m streams.runtime.native build > build/native/build.log 2>&1

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy streams agents schemas

clean:
	test ! -x $(BIN)/python || $(BIN)/python -m streams.runtime.native clean
	rm -rf $(VENV) build data .pytest_cache .mypy_cache .ruff_cache
