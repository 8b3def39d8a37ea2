# `make test` and `make demo` work on a fresh machine: they build their own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench chaos fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench
	$(BIN)/ruff format --check orchestrator
	$(BIN)/mypy --strict orchestrator

test: lint
	$(BIN)/python -m pytest -q

# The long versions of the chaos test and the fuzzers (`make test` runs short ones); the
# figures they print go in docs/reliability.md. Override the sizes, e.g.
# `make chaos CHAOS_SEEDS="42" CHAOS_KILLS=50` to rerun one seed harder.
CHAOS_SEEDS ?= 1 2 3 4 5 6 7 8 9 10
CHAOS_KILLS ?= 25
FUZZ_EXAMPLES ?= 2000
FUZZ_RAW_CONNECTIONS ?= 20000
FUZZ_RANDOM_INPUTS ?= 100000
FUZZ_SEED ?= 1

chaos: $(STAMP)
	CHAOS_SEEDS="$(CHAOS_SEEDS)" CHAOS_KILLS=$(CHAOS_KILLS) \
		$(BIN)/python -m pytest -q -s tests/test_chaos.py tests/test_crash_recovery.py

fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RAW_CONNECTIONS=$(FUZZ_RAW_CONNECTIONS) \
		FUZZ_RANDOM_INPUTS=$(FUZZ_RANDOM_INPUTS) FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/python -m pytest -q -s tests/test_fuzz_protocol.py tests/test_fuzz_handoff.py \
		tests/test_hostile.py

demo: $(STAMP)
	$(BIN)/orchestrator demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
