# Two commands: `make demo` and `make test`. Both create .venv when it is missing and reuse it after.
# `make lint` runs ruff (rules in pyproject.toml; installed with the test extra); CI runs it before the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo demo-digits test lint install clean bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (an unpinned torch would pull a CUDA build); pyproject says torch>=2.4.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

# Every test runs, the slow ones too; a test skipped without a stated reason fails the run
# (tests/helpers/skip_policy.py, loaded by tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) -m latentdiff.demo

demo-digits: $(STAMP)
	$(PY) -m latentdiff.demo_digits

bench: $(STAMP)
	$(PY) benchmarks/unet_throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
