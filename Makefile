# Two commands do all set-up on a fresh machine:
#   make bench   builds everything and runs the benchmark on the built-in model
#   make test    builds everything and runs the test suite
# Both create .venv, install the pinned torch FIRST (a bare `torch` would pull a newer multi-GB
# build), then build this package against it with --no-build-isolation.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := $(shell find csrc fastvideo_offload -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml
BENCH_ARGS ?=

.PHONY: bench test clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.deps: $(VENV)/.torch
	$(PIP) install -q "$(TORCH_SPEC)" setuptools ninja numpy pytest hypothesis tqdm matplotlib
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

bench: $(VENV)/.built
	$(PY) -m fastvideo_offload bench $(BENCH_ARGS)

test: $(VENV)/.built
	$(PY) -m pytest tests -q

clean:
	rm -rf build *.egg-info fastvideo_offload/*.so
