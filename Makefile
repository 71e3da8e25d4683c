# Two commands: `make demo` and `make test`. Both create .venv when it is missing and reuse it after.
# `make lint` runs ruff (rules in pyproject.toml; installed with the test extra); CI runs it before the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo demo-digits test lint install clean bench bench-compile bench-gpu

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

# `make bench`: every timing side by side in one run, at the lowest priority (the machine may be shared); ratios
# are the figures to read. `make bench-compile` adds torch.compile (inductor) rows: a cold compile of each U-Net
# takes minutes on a small CPU. `make bench-gpu` is the GPU benchmark (CUDA; tiny on a CPU).
BENCH := nice -n 19 $(PY)

bench: $(STAMP)
	$(BENCH) benchmarks/unet_throughput.py --threads 1
	$(BENCH) benchmarks/compile_speed.py --models digits,cifar10,ldm_small --variants eager,channels_last
	$(BENCH) benchmarks/sampling_breakdown.py
	$(BENCH) benchmarks/stream_throughput.py
	$(BENCH) benchmarks/threads.py

bench-compile: $(STAMP)
	$(BENCH) benchmarks/compile_speed.py --models digits --variants eager,compiled --repeats 1

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
