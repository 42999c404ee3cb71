# The two commands of the README: `make compare` runs the main job, `make test` the tests.
# Both set up .venv on first use (CPU torch first when no torch is installed).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup compare test lint mutate docs
setup:
	@./scripts/setup.sh

compare: setup
	$(BIN)/pvae compare $(ARGS)

# Two worker processes (pytest-xdist): the tests use one torch thread each. PYTEST_WORKERS=0
# runs them in this process. Work stealing: a worker that runs out takes queued tests from the
# other, so the suite does not end with one worker busy on a long tail and the other idle.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(if $(filter 0,$(PYTEST_WORKERS)),,--dist worksteal) $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy pvae && $(BIN)/mypy models inference

# The documentation site (Sphinx, offline) into docs/_build/html; warnings are errors, as in CI.
docs: setup
	$(BIN)/sphinx-build -E -W --keep-going -q -b html docs docs/_build/html

# Plausible bugs applied one at a time (files edited in place and restored): prints caught/total.
mutate: setup
	$(BIN)/python scripts/mutate.py $(ARGS)
