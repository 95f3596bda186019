#!/usr/bin/env bash
# One-shot GPU check for the fused ops (issue 4). Run from the repository root on a machine with a
# CUDA GPU; everything it produces goes under $OUT (default ./gpu_check_out):
#   build.log, build_seconds.txt   in-place build of common._C with the CUDA kernels
#   test_cuda.log                  pytest tests/test_ops.py -k cuda (incl. the slow >2^31 test)
#   ops_cuda.json, bench.log       bench/ops.py at the spec's realistic shapes
#   step_share_cuda.json           bench/step_share.py: step time and op share per method (real shapes)
# Usage: bash bench/gpu_check.sh            (PY=python3 by default; MAX_JOBS=8; TORCH_CUDA_ARCH_LIST=9.0)
set -u
PY=${PY:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-8} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || true
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" > "$OUT/env.txt" 2>&1
start=$(date +%s)
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
echo "$(( $(date +%s) - start ))" > "$OUT/build_seconds.txt"
if [ $rc -ne 0 ]; then echo "build failed (see $OUT/build.log)"; tail -30 "$OUT/build.log"; exit 1; fi
export RAR_OPS_REQUIRE_EXT=1
timeout 420 $PY -m pytest tests/test_ops.py -k cuda -q -rs -p no:cacheprovider > "$OUT/test_cuda.log" 2>&1
echo "tests rc=$?" >> "$OUT/test_cuda.log"
tail -5 "$OUT/test_cuda.log"
timeout 600 $PY bench/ops.py --device cuda --out "$OUT/ops_cuda.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
tail -60 "$OUT/bench.log"
# whole-step share (kernels.md §7), eager only to fit the device budget; `--compile` adds the compiled rows
timeout 300 $PY bench/step_share.py --device cuda --amp --out "$OUT/step_share_cuda.json" > "$OUT/step_share.log" 2>&1
echo "step_share rc=$?" >> "$OUT/step_share.log"
tail -15 "$OUT/step_share.log"
