"""Build the TensorRT engines of an ONNX export made by ``export/to_onnx.py`` (GPU + TensorRT >= 10).

    python export/trt_engines.py onnx/ [--precision fp16] [--engines DIR] [--workspace-gib 8]

Engines are cached under ``EXPORT_DIR/engines`` keyed by ONNX content, precision, shapes,
TensorRT version and GPU: a second run reuses them, a changed key rebuilds. The same step as
``python -m dp360rt.export ... --to trt``, for an export that already exists.
"""
import sys

from dp360rt.export.cli import engines_main

if __name__ == "__main__":
    sys.exit(engines_main(prog="export/trt_engines.py"))
