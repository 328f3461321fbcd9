# The two commands a new user needs: `make demo` and `make test`. Both create .venv if missing
# and install the pinned dependencies (constraints.txt) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit integration bench clean install coverage test-cpu

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/trainbus demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Line coverage of the product packages over the whole suite, subprocesses included (the
# [tool.coverage.*] sections of pyproject.toml); `make coverage PYTEST_ARGS=tests/unit` for a part.
# The report is printed even when a test fails; the exit status is then the tests'.
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	export COVERAGE_FILE=$(CURDIR)/.coverage; \
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS); status=$$?; \
	$(BIN)/coverage combine -q && $(BIN)/coverage report && exit $$status

# The whole suite with each test file's wall and CPU seconds (its processes included), most CPU first.
test-cpu: $(STAMP)
	rm -f .test-cpu.jsonl
	TRAINBUS_CPU_REPORT=$(CURDIR)/.test-cpu.jsonl $(BIN)/python -m pytest -p tests.cpu_report $(PYTEST_ARGS); status=$$?; \
	$(BIN)/python -m tests.cpu_report .test-cpu.jsonl && exit $$status

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration

bench: $(STAMP)
	$(BIN)/trainbus bench bus

clean:
	rm -rf $(VENV) .trainbus .mypy_cache .ruff_cache .pytest_cache .coverage .coverage.* htmlcov .test-cpu.jsonl
