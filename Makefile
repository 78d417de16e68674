# peekcore: `make demo` runs the main job, `make test` runs everything CI runs.
# Both set up a virtual environment first (.venv, reused when up to date).
#
# TORCH_SPEC picks the torch build installed before peekcore. The default is
# the CPU build this project's machines carry; on a GPU machine install the
# CUDA build of torch yourself first (see README.md) and it is kept.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.peekcore-installed
CU_FILES := $(wildcard csrc/cuda/*.cu)
CPP_FILES := $(shell find csrc include examples -name '*.cpp' -o -name '*.h' -o -name '*.hpp' -o -name '*.cuh' -o -name '*.cu')

.PHONY: setup demo test lint format cuda-check browser pytest bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(CPP_FILES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,demo]"
	touch $(STAMP)

demo: setup
	$(PY) -m peekcore demo

test: setup lint cuda-check browser pytest

# The report test renders HTML in headless Chromium (Debian's package; root installs it).
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1; } || true
	@if command -v chromium >/dev/null; then echo "browser: chromium ready"; \
	else echo "browser: chromium not installed, the report render test will skip"; fi

lint: setup
	$(VENV)/bin/ruff check peekcore tests benchmarks setup.py
	$(VENV)/bin/ruff format --check peekcore tests benchmarks setup.py
	$(VENV)/bin/clang-format --dry-run -Werror $(CPP_FILES)

format: setup
	$(VENV)/bin/ruff format peekcore tests benchmarks setup.py
	$(VENV)/bin/ruff check --fix peekcore tests benchmarks setup.py
	$(VENV)/bin/clang-format -i $(CPP_FILES)

# Compile-check every CUDA source for Ampere and Hopper (no GPU needed).
cuda-check:
	@if [ -z "$(CU_FILES)" ]; then echo "cuda-check: no .cu files"; \
	elif ! command -v nvcc >/dev/null; then echo "cuda-check: SKIPPED, nvcc not found"; \
	else set -e; tmp=$$(mktemp -d); for f in $(CU_FILES); do for arch in sm_80 sm_90; do \
	  nvcc -std=c++17 -arch=$$arch -cubin -Icsrc/include -o $$tmp/out.cubin $$f; \
	done; echo "cuda-check: $$f ok (sm_80, sm_90)"; done; rm -rf $$tmp; fi
	@# the extension with its CUDA launchers (PEEKCORE_CUDA=ON): bindings and launchers agree
	@if command -v nvcc >/dev/null && [ -n "$(CU_FILES)" ]; then set -e; tmp=$$(mktemp -d); \
	  $(VENV)/bin/cmake -S . -B $$tmp -DPEEKCORE_CUDA=ON -DPEEKCORE_CUDA_ARCHITECTURES=90 \
	    -Dpybind11_DIR=$$($(PY) -c "import pybind11; print(pybind11.get_cmake_dir())") \
	    -DPython_EXECUTABLE=$(abspath $(PY)) >$$tmp.log 2>&1 && $(VENV)/bin/cmake --build $$tmp -j2 >>$$tmp.log 2>&1 \
	  || { tail -40 $$tmp.log; exit 1; }; rm -rf $$tmp $$tmp.log; echo "cuda-check: extension with CUDA launchers builds"; fi

pytest: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_modes.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_store_fit.py
	$(PY) benchmarks/bench_distributed.py

clean:
	rm -rf build $(VENV) peekcore/_core*.so
