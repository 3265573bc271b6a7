#!/usr/bin/env bash
# The CUDA path, end to end, on a machine with an NVIDIA GPU: benchmarks/gpu_check.py trains
# each case (mlp, cnn, token-mlp; INSTANT and exact) 20 steps on the CPU and on CUDA from the same
# seed and data order and checks the losses agree, resumes a CUDA run stopped half way, evaluates
# on both devices and trains under --budget on CUDA. Exits non-zero on any mismatch.
#
#   benchmarks/gpu_check.sh [BUNDLES_DIR]   # bundles named mlp-i, cnn, token-mlp (exported
#                                           # there where missing: needs torch)
#
# Needs onnxruntime-gpu: `pip install instant-runtime[cuda]`, or, with no network, its wheel
# in .whl/ (installed into /tmp/site here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
exec $PY -m benchmarks.gpu_check --bundles "${1:-$(mktemp -d)}" --json "${JSON:-gpu_check.json}"
