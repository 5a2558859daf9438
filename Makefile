# Everyday commands. `make run` and `make test` set the machine up first (idempotent).
PY := .venv/bin/python
ARGS ?=

.PHONY: setup run record test lint unit bench clean

setup:
	@bash scripts/setup.sh

run: setup  ## the agent, writing to the local store (needs root)
	$(PY) -m agent run $(ARGS)

record: setup  ## a 10 s profile of the host into profile.pb.gz
	$(PY) -m agent record --duration 10 --output profile.pb.gz $(ARGS)

lint: setup
	.venv/bin/ruff check agent tests benchmarks
	.venv/bin/ruff format --check agent tests benchmarks
	.venv/bin/mypy

unit: setup  ## tests that need no root
	$(PY) -m pytest tests/unit -q

test: lint  ## everything: lint, types, unit, BPF and integration tests
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
