"""``pytest benchmarks --benchmark-json out.json`` runs every benchmark script's pytest-benchmark
functions at tiny, quick settings (the scripts keep their own command lines for full runs).
pytest's default pattern is ``test_*.py``; this collects ``bench_*.py`` here too."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None

