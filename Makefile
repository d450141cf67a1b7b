# The two commands of the README. Each sets everything up on a fresh machine:
# a .venv, torch 2.13.0 (the CPU wheel), the package with its dependencies and
# the native extension (CUDA sources compiled when nvcc is found, against the
# CUTLASS headers of the nvidia-cutlass wheel), then runs.
#   make demo   - the main job, end to end
#   make test   - the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# test/CI: a native build failure (C++ or CUDA) is fatal; demo: warn and fall back
BUILD_NATIVE ?= 1
NATIVE_SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt setup.py pyproject.toml
STAMP := $(VENV)/.drlora-installed
PYTEST_ARGS ?=

.PHONY: demo test install bench-smoke lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) $(NATIVE_SOURCES)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet "setuptools>=68" wheel pybind11 ninja cmake "nvidia-cutlass==4.2.0.0"
	DRLORA_BUILD_NATIVE=$(BUILD_NATIVE) $(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m drlora_kernels demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench-smoke: $(STAMP)
	$(PY) -m bench --smoke

lint: $(STAMP)
	$(PY) -m ruff check drlora_kernels tests bench tools
	$(PY) -m ruff format --check drlora_kernels tests bench tools

clean:
	rm -rf build *.egg-info drlora_kernels/_C*.so drlora_kernels/_build_meta.py .pytest_cache
