#!/usr/bin/env bash
# The GPU checks of issue 14 in one go, on a machine where torch sees a CUDA GPU, sized to fit one 10-minute
# device call (on an H100: ~1.5 min of tests, ~7 min of GLM bench, most of it cold compiles), most telling
# first, so a run cut at the limit keeps what matters: tests/test_gpu.py (the engine on CUDA, its CUDA graphs of
# the compiled and uncompiled step replaying the right tokens), the GLM-4-9B-shaped bench (its results file is
# rewritten after each phase; the uncompiled step at 1 and 32 requests only, and no eager baseline: measured
# 2026-11-26, bench/results/gpu-glm4-9b.md), then the SmolLM2-shaped benches of `make bench-gpu`.
# Logs and the bench/results/gpu*.md it writes are copied to $OUT when set (the device machine's result folder).
#
#     bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
export PYTHONUNBUFFERED=1
DEST=${OUT:-}
log() { if [ -n "$DEST" ]; then tee -a "$DEST/$1"; else cat; fi; }
if [ -n "$DEST" ]; then
  # bench_gpu_glm.py rewrites its results after each phase: a run stopped at the device's time limit still
  # brings back every phase that finished
  ( while sleep 10; do cp bench/results/gpu*.md "$DEST"/ 2>/dev/null; done ) &
  copier=$!
  trap 'kill $copier 2>/dev/null' EXIT
fi
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
         "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1 | log gpu-check.log
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | log gpu-check.log
# no conftest: it builds gRPC stubs, and a GPU machine may lack grpc_tools; test_gpu.py needs none of it
tests=0
gpu_tests() {
  $PY -m pytest tests/test_gpu.py -q --noconftest -p no:cacheprovider 2>&1 | log gpu-check.log || tests=1
  echo "[gpu_check] ${SECONDS}s: tests done" | log gpu-check.log
}
bench=0
run_bench() {
  $PY "$@" 2>&1 | log gpu-check.log || bench=1
  # after each bench: a run stopped at the device's time limit still brings back what finished
  [ -n "$DEST" ] && cp bench/results/gpu*.md "$DEST"/ 2>/dev/null
  echo "[gpu_check] ${SECONDS}s: $* done" | log gpu-check.log
}
# what `make bench-gpu` runs (a GPU machine may have no make), after the tests
gpu_tests
run_bench bench/bench_gpu_glm.py --uncompiled 1 32 --eager-baseline
run_bench bench/bench_gpu.py --dtype bfloat16
run_bench bench/bench_gpu.py --dtype float32 --out bench/results/gpu-float32.md
echo "tests exit $tests, bench exit $bench" | log gpu-check.log
exit $(( tests || bench ))
