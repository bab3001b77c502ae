"""One helper for the pytest-benchmark entries of the benchmark scripts that measure whole processes."""
from __future__ import annotations

import sys
from pathlib import Path


def run_script(benchmark, script: str, args: list[str], tmp_path: Path):
    """Run ``benchmarks/<script> ARGS --json FILE`` once in a subprocess under pytest-benchmark
    (for the scripts whose figures come from whole processes: services, renders); returns the
    JSON it wrote and puts it in the benchmark's ``extra_info``."""
    import json
    import os
    import subprocess
    here = Path(__file__).resolve().parent
    out = tmp_path / f"{Path(script).stem}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent / "python"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(here / script), *args, "--json", str(out)]
    proc = benchmark.pedantic(lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200),
                              rounds=1, iterations=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result, f"{script} wrote an empty result"
    benchmark.extra_info[Path(script).stem] = result
    return result
