# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test coverage mutation lint format bench clean install install-test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml plugins/example_disk_usage/pyproject.toml | $(PY)
	$(PIP) install -e '.[test,bench]' -e plugins/example_disk_usage
	touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-run
install-test: $(VENV)/.installed-test

## Start the server on the embedded SQLite default with demo traffic (Ctrl-C stops it).
run: install
	$(PY) run.py --config conf/quotaserver.yaml --demo

## The whole suite (unit, API, real-time, browser), in TEST_WORKERS processes (pytest-xdist):
## most tests wait on sockets, servers and browsers, not on the CPU, so 4 processes on 2 cores
## halve the wall time (docs/testing.md). Each file runs whole in one process (--dist loadfile);
## TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 4
test: install-test
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## The suite under coverage.py, run.py server subprocesses included (coverage's .pth starts
## it in every Python process when COVERAGE_PROCESS_START is set); then per-module branch
## coverage. A report, not a gate: docs/testing.md says how to read it.
coverage: install-test
	rm -f .coverage .coverage.*
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml COVERAGE_FILE=$(CURDIR)/.coverage \
		$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	$(PY) -m coverage combine -q; \
	$(PY) -m coverage report; \
	exit $$status

## Mutation testing of the core (mutmut; the modules and their test files are in
## pyproject.toml's [tool.mutmut]): a fresh run, then the score per module, failing below
## MUTATION_MIN %. About an hour on 2 cores (docs/testing.md). mutmut copies only Python
## files into mutants/, so the package's links to templates/, static/ and conf/ are made
## there first.
MUTATION_MIN ?= 85
## Most mutants' tests wait on sockets and sleeps, not the CPU: 6 at a time on 2 cores.
## mutmut's time limit is CPU time per mutant, so more at once does not make timeouts.
MUTATION_CHILDREN ?= 6
mutation: install-test
	rm -rf mutants && mkdir -p mutants/quotaserver
	for d in static templates conf; do ln -s ../$$d mutants/quotaserver/$$d; done
	# The built-in plugins as mutmut copied them: the editable install maps this package
	# to the checkout's plugins/, which would put the working tree under every mutant.
	ln -s ../plugins mutants/quotaserver/builtin_plugins
	$(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN)
	$(PY) .ci/mutation_report.py --min $(MUTATION_MIN)

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## Side-by-side benchmark at a small size (numbers, not pass/fail); see docs/benchmarks.md.
## The whole table: .venv/bin/python bench/run_all.py --full
bench: install-test
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) data .pytest_cache mutants
