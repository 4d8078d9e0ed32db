#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one CUDA GPU (about 6
# minutes on one H100): the gpu-marked tests (tests/test_gpu.py and the CUDA
# entropy test), then benchmarks/bench_gpu.py at full sizes, which writes its
# result file and summary.json's gpu_dp_step_ratio.
#
#     bash benchmarks/gpu_check.sh
#
# Logs go to $OUT when it is set (else to a temporary folder, named at the end).
# Python: $PRIVIMAGE_PYTHON, else .venv/bin/python, else python3. The end-to-end
# rows read the MNIST files the tests read (PRIVIMAGE_DATA_DIR, default
# data_cache/) and the glyph fonts of docs/data.md.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PRIVIMAGE_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
LOGS="${OUT:-$(mktemp -d)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PRIVIMAGE_DATA_DIR="${PRIVIMAGE_DATA_DIR:-$ROOT/data_cache}"
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (no NVIDIA driver?)"
# -m gpu replaces the default "-m 'not slow'" (pyproject.toml): only the CUDA tests
timeout 330 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py \
  tests/test_entropy.py 2>&1 | tee "$LOGS/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout 240 "$PY" benchmarks/bench_gpu.py 2>&1 | tee "$LOGS/bench-gpu.log"
bench=${PIPESTATUS[0]}
echo "gpu tests: exit $tests; bench_gpu.py: exit $bench; logs in $LOGS"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
