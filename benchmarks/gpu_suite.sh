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
  # the viewer stage's WebSocket figure (its render figures need none of these)
  "$PY" -m pip install --quiet --no-index --find-links gpu_wheels starlette anyio sniffio idna typing_extensions \
    httpx httpcore h11 certifi 2>&1 | tail -2 || true
fi
# dp360rt._C (the native scheduler) is built in place from the image's cmake + pybind11 when it is
# not importable (no pip build needed; about 15 s).
if ! "$PY" -c "import dp360rt._C" 2>/dev/null && command -v cmake >/dev/null && "$PY" -c "import pybind11" 2>/dev/null; then
  if timeout 300 cmake -S . -B build/gpu_C -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
       -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DSKBUILD_PROJECT_VERSION=0.1.0 >/dev/null \
     && timeout 300 cmake --build build/gpu_C -j 8 >/dev/null && cp build/gpu_C/_C*.so python/dp360rt/; then
    echo "[gpu_suite] built dp360rt._C in place"
  else
    echo "[gpu_suite] could not build dp360rt._C: the native-scheduler tests are left out"
  fi
fi
exec "$PY" benchmarks/gpu_suite.py "$@"
