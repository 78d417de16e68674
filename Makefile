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

# Each step says what it does and how long it usually takes (2 cores, a warm pip cache);
# the whole set-up runs once and is reused until pyproject.toml or the C++ sources change.
$(STAMP): pyproject.toml setup.py CMakeLists.txt $(CPP_FILES)
	@echo "setup 1/4: virtual environment $(VENV) (a few seconds)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup 2/4: upgrading pip in $(VENV) (about 10 s)"
	@$(PIP) install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "setup 3/4: torch already installed, kept"; \
	else echo "setup 3/4: installing $(TORCH_SPEC) (CPU build, about 1-2 min)"; \
	  $(PIP) install --quiet "$(TORCH_SPEC)"; fi
	@echo "setup 4/4: building peekcore's C++ extension (CMake) and installing it with the"
	@echo "           test and demo extras (about 1-3 min; pip is quiet while the compiler runs)"
	@$(PIP) install --quiet -e ".[test,demo]"
	@touch $(STAMP)
	@echo "setup: done"

demo: setup
	$(PY) -m peekcore demo

test: setup lint cuda-check browser pytest

# The report test renders HTML in headless Chromium. Where it is missing and we are root
# with apt-get, Debian's chromium package is installed (about 300 MB under /usr/lib/chromium,
# 1-2 min); `make test SKIP_BROWSER=1` skips this step (the render test then skips).
SKIP_BROWSER ?=
browser:
	@if [ -n "$(SKIP_BROWSER)" ]; then echo "browser: skipped (SKIP_BROWSER set)"; \
	elif command -v chromium >/dev/null; then echo "browser: chromium found at $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "browser: installing Debian's chromium package with apt-get (about 300 MB into"; \
	  echo "         /usr/lib/chromium, 1-2 min; skip with make test SKIP_BROWSER=1)"; \
	  apt-get update -qq && apt-get install -y -qq chromium >/dev/null \
	  && echo "browser: chromium installed at $$(command -v chromium)" \
	  || echo "browser: apt-get could not install chromium, the report render test will skip"; \
	else echo "browser: chromium not installed (not root or no apt-get), the render test will skip"; fi

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

# One line per test file (not a screen of dots), then the ten slowest tests.
pytest: setup
	$(PY) -m pytest --durations=10

bench: setup
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_modes.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_store_fit.py
	$(PY) benchmarks/bench_distributed.py

clean:
	rm -rf build $(VENV) peekcore/_core*.so
