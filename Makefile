# Everything a fresh Debian machine needs, then the thing asked for.
VENV  := .venv
PY    := $(VENV)/bin/python
SUM   := $(shell cksum < pyproject.toml | cut -d' ' -f1)
# What running zohofs needs, and what testing it needs on top (each installed once).
RUN_STAMP  := $(VENV)/.run-$(SUM)
TEST_STAMP := $(VENV)/.test-$(SUM)

.PHONY: all deps demo test lint unit bench clean

all: test

deps: $(TEST_STAMP)

$(RUN_STAMP): pyproject.toml scripts/install-system-deps
	./scripts/install-system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e .
	rm -f $(VENV)/.run-*
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	./scripts/install-system-deps --test
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.test-*
	touch $@

demo: $(RUN_STAMP)
	$(VENV)/bin/zohofs demo $(DEMO_ARGS) $(MOUNTPOINT)

lint: deps
	$(PY) -m ruff check zohofs tests bench
	$(PY) -m mypy zohofs tests bench

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: deps
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/scoreboard.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
