#!/usr/bin/env bash
# The GPU checks of issue 14 in one go, on a machine where torch sees a CUDA GPU (a few minutes on an H100/H200),
# most telling first, so a run cut at the device's time limit keeps what matters: tests/test_gpu.py's eager-step
# tests (the engine on CUDA, its CUDA graphs replaying the right tokens), the GLM-4-9B-shaped bench (its results
# file is rewritten after each phase), test_gpu.py's compiled-step tests (cold inductor compiles), then the
# SmolLM2-shaped benches of `make bench-gpu`.
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
gpu_tests() {  # $1: pytest -k expression
  $PY -m pytest tests/test_gpu.py -q --noconftest -p no:cacheprovider -k "$1" 2>&1 | log gpu-check.log || tests=1
  echo "[gpu_check] ${SECONDS}s: tests -k '$1' done" | log gpu-check.log
}
bench=0
run_bench() {
  $PY "$@" 2>&1 | log gpu-check.log || bench=1
  # after each bench: a run stopped at the device's time limit still brings back what finished
  [ -n "$DEST" ] && cp bench/results/gpu*.md "$DEST"/ 2>/dev/null
  echo "[gpu_check] ${SECONDS}s: $* done" | log gpu-check.log
}
# what `make bench-gpu` runs (a GPU machine may have no make), with the test halves around the GLM bench
gpu_tests "not compiled"
run_bench bench/bench_gpu_glm.py
gpu_tests "compiled"
run_bench bench/bench_gpu.py --dtype bfloat16
run_bench bench/bench_gpu.py --dtype float32 --out bench/results/gpu-float32.md
echo "tests exit $tests, bench exit $bench" | log gpu-check.log
exit $(( tests || bench ))
