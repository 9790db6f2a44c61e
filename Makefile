# Two commands for a fresh clone: `make demo` and `make test`. Needs Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8008
DEMO_DATA ?= demo-data

.PHONY: install demo test test-single test-workers lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/python scripts/demo.py --port $(PORT) --data $(DEMO_DATA)

# The whole suite twice: one Synapse on SQLite, then PostgreSQL + Redis + media workers.
test: test-single test-workers

test-single: install
	MSC3916_TOPOLOGY=single $(BIN)/python -m pytest -ra $(PYTEST_ARGS)

test-workers: install
	MSC3916_TOPOLOGY=workers $(BIN)/python -m pytest -ra $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check synapse_msc3916 tests bench scripts
	$(BIN)/mypy synapse_msc3916

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo-data build *.egg-info
