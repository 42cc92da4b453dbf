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

.PHONY: bench test lint format sanitize tsan wheel gpu-check-dry gpu-wheels clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

# FastVideo pins its own torch: it goes in with --no-deps, then only what importing and building
# its DiTs needs, each install naming the pinned torch so that nothing can replace it.
FASTVIDEO_DEPS := numpy==2.4.6 cloudpickle==3.1.3 imageio==2.38.1 torchvision==0.29.1 PyYAML==6.0.4 \
	diffusers==0.42.1 einops==0.8.2 remote-pdb==2.1.0 ftfy==6.3.1 transformers==5.24.0 scipy==1.17.1 psutil==7.2.2

# The weight formats the tests offload (tests/test_formats.py): torchao's tensor subclasses, GGUF files
# read by diffusers, and bitsandbytes, which enable refuses.
FORMAT_DEPS := torchao==0.18.0 gguf==0.19.0 bitsandbytes==0.50.2

# LoRA through offloaded blocks (tests/test_training.py): peft, as users add adapters.
TRAINING_DEPS := peft==0.21.2

$(VENV)/.deps: $(VENV)/.torch
	$(PIP) install -q "$(TORCH_SPEC)" setuptools ninja pytest hypothesis tqdm matplotlib accelerate $(FASTVIDEO_DEPS) \
		$(FORMAT_DEPS) $(TRAINING_DEPS)
	$(PIP) install -q --no-deps fastvideo==0.2.1
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

bench: $(VENV)/.built
	$(PY) -m fastvideo_offload bench $(BENCH_ARGS)

# The suite on the synchronous CPU device, then again on the asynchronous one, whose copies run on
# a thread with random delays and poisoned slots, as a GPU's copy engine runs ahead and behind
# (less the tests marked sync_pass_only, whose verdict no copy ordering can change).
test: $(VENV)/.built
	FASTVIDEO_OFFLOAD_REQUIRE_INTEGRATIONS=1 $(PY) -m pytest tests -q
	FASTVIDEO_OFFLOAD_REQUIRE_INTEGRATIONS=1 FASTVIDEO_OFFLOAD_CPU_TRANSFER=async $(PY) -m pytest tests -q -m "not sync_pass_only"

# ruff, pinned, with the rules in pyproject.toml, and clang-format, pinned, with the style in
# .clang-format (CI runs both first).
RUFF_SPEC := ruff==0.17.6
CLANG_FORMAT_SPEC := clang-format==20.1.8
CXX_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

$(VENV)/.ruff: $(VENV)/.torch
	$(PIP) install -q "$(RUFF_SPEC)"
	touch $@

$(VENV)/.clang-format: $(VENV)/.torch
	$(PIP) install -q "$(CLANG_FORMAT_SPEC)"
	touch $@

lint: $(VENV)/.ruff $(VENV)/.clang-format
	$(PY) -m ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

# Rewrites the C++ in place as lint wants it.
format: $(VENV)/.clang-format
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# The C++ under AddressSanitizer and UndefinedBehaviorSanitizer, and under ThreadSanitizer on the
# asynchronous CPU device (CI runs both after `make test`).
sanitize: $(VENV)/.built
	scripts/sanitize.sh $(PY) address

tsan: $(VENV)/.built
	scripts/sanitize.sh $(PY) thread

# The wheel a user's `pip install --no-build-isolation .` builds, installed alone and imported.
wheel: $(VENV)/.built
	scripts/check_wheel.sh $(PY)

# scripts/gpu_check.sh as a CPU dry run (CI): every Python file of the GPU call runs, on the CPU
# device, so that the first GPU call cannot fail on a typo or a missing file.
gpu-check-dry: $(VENV)/.built
	PYTHON=$(abspath $(PY)) scripts/gpu_check.sh --dry-run build/gpu-check-dry

# The packages a GPU machine (no network; torch, transformers, accelerate already there) lacks for
# the FastVideo and diffusers modes and tests: pure-Python wheels in .whl/, which scripts/gpu_*.sh
# install when the device call carries .whl.
GPU_WHEELS := diffusers==0.42.1 fastvideo==0.2.1 remote-pdb==2.1.0 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf build *.egg-info fastvideo_offload/*.so
