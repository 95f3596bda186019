#!/usr/bin/env bash
# One-command GPU check of the fused ops (issue 17; README "GPU check"). Run from the repository root on
# the GPU machine. Everything goes under $OUT (7 files; the device tool returns at most 8):
#   env.txt               nvidia-smi, python/torch/CUDA versions, which extension was used and how
#   ext.log               the prebuilt-extension check, or the in-place build when there is no usable one
#   test_cuda.log         pytest -m cuda: reference equality, grads, opcheck, compile, streams, graphs, > 2^31
#   ops_cuda.json         bench/ops.py at the spec shapes (eager / compiled / op / floor, fwd and fwd+bwd)
#   step_share_cuda.json  bench/step_share.py: whole-step time and op share per method, ext vs ref
#   bench.log             the output of both benchmarks
#   summary.txt           the short summary, also printed at the end
# The extension: build/device (PREBUILT), made on a CPU machine by `make build-cuda-device` and carried,
# is used when its stamp matches this torch and the sources and the .so loads with CUDA kernels;
# otherwise common._C is built in place here (minutes). Wheels carried in .whl/ (`make device-wheels`:
# PyAV, which python3 there lacks) are installed into $SITE (/tmp/site) and put on PYTHONPATH.
# Budget: BUDGET_S seconds in all (default 540, inside the device's 10-minute command limit); every step
# runs under its own timeout sized from what is left, and the benchmarks write their JSON as they go.
# STEPS (default "tests ops share") picks the steps after the extension one.
# Exit status: 0 all steps ran and the tests passed; 1 a step failed; 2 no usable extension; 3 no CUDA GPU.
set -u
PY=${PY:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
PREBUILT=${PREBUILT:-build/device}
BUDGET_S=${BUDGET_S:-540}
SITE=${SITE:-/tmp/site}  # where the carried wheels are installed
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
# slot CAP RESERVE: seconds for the next step, min(CAP, time left - RESERVE for the steps after it), >= 30
slot() { local s=$(($(left) - $2)); ((s > $1)) && s=$1; ((s < 30)) && s=30; echo "$s"; }
STEPS=${STEPS:-tests ops share}  # a subset reruns only those steps (e.g. STEPS=share BUDGET_S=240)
want() { [[ " $STEPS " == *" $1 "* ]]; }
status=0
note() { echo "$*" | tee -a "$OUT/env.txt"; }

# ---- environment ------------------------------------------------------------------------------
{ date -u; nvidia-smi || echo "nvidia-smi: not available"; } > "$OUT/env.txt" 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      >> "$OUT/env.txt" 2>&1; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    note "wheels: installed $(cd .whl && ls *.whl | tr '\n' ' ')into $SITE"
  else
    note "wheels: pip install of .whl/*.whl failed (see above)"
  fi
fi
$PY - >> "$OUT/env.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "| sm_%d%d" % (p.major, p.minor), "|", p.multi_processor_count, "SMs |",
          round(p.total_memory / 2**30, 1), "GiB")
EOF

# ---- the extension: the carried prebuilt one, else an in-place build ------------------------------
ext=""
: > "$OUT/ext.log"
load_check() {  # the in-place common/_C*.so imports under this torch and has CUDA kernels
  $PY -c "import torch, common._C as C; print('common._C: WITH_CUDA', C.WITH_CUDA, '|', C.BUILD_INFO)
assert C.WITH_CUDA, 'common._C has no CUDA kernels'" >> "$OUT/ext.log" 2>&1
}
if $PY bench/gpu_check.py match "$PREBUILT" >> "$OUT/ext.log" 2>&1; then
  rm -f common/_C*.so && cp "$PREBUILT"/common/_C*.so common/
  if load_check; then
    ext="prebuilt $PREBUILT"
  else
    echo "prebuilt $PREBUILT is not usable here (see above)" >> "$OUT/ext.log"
  fi
fi
if [ -z "$ext" ]; then
  rm -f common/_C*.so
  start=$(date +%s)
  echo "building common._C in place (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)" >> "$OUT/ext.log"
  FORCE_CUDA=1 timeout "$(slot 330 180)" $PY setup.py build_ext --inplace >> "$OUT/ext.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  if [ $rc -eq 0 ] && load_check; then ext="built in place in ${secs} s"; fi
fi
if [ -z "$ext" ]; then
  note "extension: no usable common._C (see ext.log)"; tail -25 "$OUT/ext.log"; exit 2
fi
note "extension: $ext"
if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  note "no CUDA GPU visible to torch: stopping after the extension step"; exit 3
fi
export RAR_OPS_REQUIRE_EXT=1

# ---- CUDA tests ----------------------------------------------------------------------------------
if want tests; then
  tests=()
  if ! $PY -c "import av" 2> /dev/null; then
    tests=(tests/test_ops.py)  # the other test modules import PyAV at collection; all CUDA tests are here
    note "tests: PyAV missing (carry it: make device-wheels), running tests/test_ops.py only"
  fi
  timeout "$(slot 200 250)" $PY -m pytest -m cuda ${tests[@]+"${tests[@]}"} -q -rs -p no:cacheprovider \
    --durations=8 > "$OUT/test_cuda.log" 2>&1
  rc=$?
  echo "pytest rc=$rc" >> "$OUT/test_cuda.log"
  [ $rc -eq 0 ] || status=1
fi

# ---- op table ------------------------------------------------------------------------------------
: > "$OUT/bench.log"
if want ops; then
  s=$(slot 180 90)
  echo "== bench/ops.py (budget $((s - 20)) s)" >> "$OUT/bench.log"
  timeout "$s" $PY bench/ops.py --device cuda --budget-s $((s - 20)) --out "$OUT/ops_cuda.json" >> "$OUT/bench.log" 2>&1
  rc=$?
  echo "ops rc=$rc" >> "$OUT/bench.log"
  [ $rc -eq 0 ] || status=1
fi

# ---- whole-step share (eager; --compile would add the compiled rows) -------------------------------
if want share; then
  s=$(slot 600 15)
  echo "== bench/step_share.py (budget $((s - 25)) s)" >> "$OUT/bench.log"
  timeout "$s" $PY bench/step_share.py --device cuda --amp --warmup 3 --iters 10 --profile-iters 2 \
    --budget-s $((s - 25)) --out "$OUT/step_share_cuda.json" >> "$OUT/bench.log" 2>&1
  rc=$?
  echo "step_share rc=$rc" >> "$OUT/bench.log"
  [ $rc -eq 0 ] || status=1
fi

# ---- summary -------------------------------------------------------------------------------------
{
  echo "gpu_check: $(($(date +%s) - T0)) s of $BUDGET_S, exit $status; extension: $ext"
  grep -m1 "^gpu " "$OUT/env.txt"
  $PY bench/gpu_check.py summary "$OUT"
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
exit $status
