#!/usr/bin/env bash
# One GPU session's work, in steps that each fit the device tool's 10-minute limit:
#
#   bash benchmarks/gpu_session.sh build-test     # build (MAX_JOBS=16) + the whole test suite on CUDA
#   bash benchmarks/gpu_session.sh aux_head       # build if needed + bench_aux_head
#   bash benchmarks/gpu_session.sh replay         # build if needed + bench_replay
#   bash benchmarks/gpu_session.sh overlap        # build if needed + bench_overlap
#
# Results go to benchmarks/results/ and, when $OUT is set (the device tool), are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}"
step="${1:?usage: gpu_session.sh build-test|aux_head|replay|overlap}"

build() {
  if ! python -c "import dgl_fast, sys; sys.exit(0 if dgl_fast.build_config()['cuda'] else 1)" 2>/dev/null; then
    pip install --no-build-isolation --no-deps -e . > /tmp/dgl_fast_build.log 2>&1 || { tail -50 /tmp/dgl_fast_build.log; exit 1; }
  fi
  python -m dgl_fast info
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
}

save() {
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results"
    cp -r benchmarks/results/. "$OUT/results/" 2>/dev/null || true
  fi
}

case "$step" in
  build-test)
    build
    # the SIMT emulator's tests (CPU stand-ins for the GPU) run in CI; here the real kernels do
    python -m pytest -q -x tests --ignore=tests/test_simt.py 2>&1 | tee /tmp/dgl_fast_tests.log | tail -40
    if [ -n "${OUT:-}" ]; then cp /tmp/dgl_fast_tests.log "$OUT/tests.log"; fi
    ;;
  aux_head|replay|overlap)
    build
    python -m dgl_fast bench "$step"
    save
    ;;
  *)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
