"""Export DiffPortrait360 to static-shape ONNX files (+ manifest.json), offline.

    python export/to_onnx.py --nvs model_state-340000.th --backview back_head-230000.th --out onnx/ --fp16
    python export/to_onnx.py --random --config tiny --out /tmp/onnx          # random weights, for testing

Every option of ``python -m dp360rt.export`` (``--help`` lists them); this script is that command,
kept beside the other offline tools. Not named ``onnx.py``: a script's folder comes first on
``sys.path``, so that name would hide the ``onnx`` package from the exporter.
"""
import sys

from dp360rt.export.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="export/to_onnx.py"))
