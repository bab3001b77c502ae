#!/usr/bin/env bash
# Every GPU check and benchmark in one command (<= 10 minutes on an H100/H200):
#   bash benchmarks/gpu_suite.sh            # on the GPU machine; JSON to $OUT (or ./gpu_results)
#   bash benchmarks/gpu_suite.sh --dry-run  # CPU, tiny config, seconds (CI runs this)
# The GPU machine has no network: the package runs from source (PYTHONPATH), and pure-Python
# wheels it may lack (pillow, safetensors, tqdm, pytest) are installed from ./gpu_wheels when that
# folder was carried along (see benchmarks/RESULTS.md for the command that fills it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [ -d gpu_wheels ]; then
  "$PY" -m pip install --quiet --no-index --find-links gpu_wheels pillow safetensors tqdm pytest numpy 2>&1 | tail -2 || true
fi
exec "$PY" benchmarks/gpu_suite.py "$@"
