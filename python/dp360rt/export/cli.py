"""``export`` subcommand: ``add_parser(subparsers)`` for the main CLI, ``main()`` for ``python -m dp360rt.export``
(and the repository's ``export/to_onnx.py``), ``engines_main()`` for ``export/trt_engines.py``.

    python -m dp360rt.export --nvs NVS.th --backview BACK.th --out onnx/ [--fp16] [--profiles window8x2cfg backview]
    python -m dp360rt.export --random --config tiny --out /tmp/onnx            # random weights, for testing
    python -m dp360rt.export --fixture tests/fixtures/setA --out /tmp/onnx_setA # a fixture set's weights
    python -m dp360rt.export ... --to trt                                       # then build TensorRT engines

Heavy imports (onnx, the exporter) happen in the handler, so registering the subcommand is cheap.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

DESCRIPTION = "export the networks to static-shape ONNX files (+ manifest.json), optionally build TensorRT engines"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand; its handler (``set_defaults(func=...)``) returns an exit code."""
    p = subparsers.add_parser("export", help=DESCRIPTION, description=DESCRIPTION)
    configure(p)
    p.set_defaults(fn=run, func=run)   # `fn`: the dp360rt CLI's dispatch attribute
    return p


def configure(p: argparse.ArgumentParser) -> None:
    from .profiles import BUILTIN_PROFILES, MODULES
    src = p.add_argument_group("weights (at least one source)")
    src.add_argument("--nvs", metavar="CKPT", help="360° view generator checkpoint (model_state-340000.th)")
    src.add_argument("--backview", metavar="CKPT", help="back-view generator checkpoint (back_head-230000.th)")
    src.add_argument("--random", action="store_true", help="random weights for both models (testing, timing)")
    src.add_argument("--fixture", metavar="DIR", help="a fixture set's config and weights (e.g. tests/fixtures/setA)")
    src.add_argument("--seed", type=int, default=0, help="seed of --random")
    p.add_argument("--to", choices=("onnx", "trt"), default="onnx", help="onnx: ONNX files; trt: also TensorRT engines")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (manifest.json, <kind>/*.onnx)")
    p.add_argument("--config", default="full", help="full | tiny | medium | PATH to config.json (default: full)")
    p.add_argument("--profiles", nargs="+", metavar="PROFILE",
                   help=f"built-in {sorted(BUILTIN_PROFILES)} or NAME=ROWS:COND[:KIND], either with @HxW for another "
                        "image size (default: every built-in profile of the given models)")
    p.add_argument("--modules", nargs="+", choices=MODULES, help="export only these networks")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and matmuls/convolutions (autocast-like)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto")
    p.add_argument("--attention", choices=("lse", "concat"), default=None,
                   help="shared-bank attention form (default: lse for onnx, concat for trt)")
    p.add_argument("--release", action="store_true",
                   help="free each network's weights after its files are written (full-size exports in little RAM)")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch CPU threads while tracing (default: torch's)")
    add_trt_arguments(p.add_argument_group("TensorRT (--to trt)"))


def add_trt_arguments(trt) -> None:
    """The engine-building options (``--precision``, ``--engines``, ``--workspace-gib``) on a parser or group."""
    trt.add_argument("--precision", choices=("fp32", "fp16", "bf16", "fp8", "int8"), default=None,
                     help="engine precision (default: fp16)")
    trt.add_argument("--engines", metavar="DIR",
                     help="engine cache directory (default: the export directory's engines/)")
    trt.add_argument("--workspace-gib", type=float, default=8.0)


def _load_model(a: argparse.Namespace, kind: str):
    """(model, source description) of one kind from --fixture, --random or its checkpoint."""
    import torch
    from dp360rt.checkpoint import fixture_state_dict, load_checkpoint
    from dp360rt.config import load_config
    from dp360rt.model import build_model, init_random
    cfgs = load_config(a.fixture or a.config)
    if kind not in cfgs:
        raise ValueError(f"the config {a.fixture or a.config} has no {kind} model")
    m = build_model(kind, cfgs[kind])
    if a.fixture:
        load_checkpoint(m, fixture_state_dict(a.fixture, kind))
        return m, f"fixture {a.fixture}"
    if a.random:
        torch.manual_seed(a.seed)
        with torch.no_grad():
            init_random(m)
        return m, f"random seed {a.seed}"
    ckpt = getattr(a, kind)
    load_checkpoint(m, ckpt)
    return m, str(ckpt)


def run(a: argparse.Namespace) -> int:
    """The handler: returns the process exit code (0 ok, 1 export failed, 2 bad arguments / missing tools)."""
    if not (a.nvs or a.backview or a.random or a.fixture):
        print("export: give the weights: --nvs CKPT and/or --backview CKPT, --random, or --fixture DIR",
              file=sys.stderr)
        return 2
    if a.random and (a.nvs or a.backview or a.fixture) or (a.fixture and (a.nvs or a.backview)):
        print("export: --random, --fixture and checkpoints exclude each other", file=sys.stderr)
        return 2
    try:
        import onnx  # noqa: F401
    except ImportError:
        print("export: needs the onnx package: pip install onnx onnxruntime (or pip install 'dp360rt[export]')",
              file=sys.stderr)
        return 2
    if a.to == "trt":                       # fail before a long export, not after
        from dp360rt.backends.trt_backend import TrtUnavailableError, import_trt
        try:
            import_trt()
        except TrtUnavailableError as e:
            print(f"export --to trt: {e}", file=sys.stderr)
            return 2
    from dp360rt.checkpoint import CheckpointError
    from dp360rt.io.checks import writable_dir
    from dp360rt.config import ConfigError
    from .onnx_export import ExportOptions, export_models, format_summary
    from .profiles import DEFAULT_PROFILES, parse_profiles
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    try:
        given = {"nvs", "backview"} if (a.random or a.fixture) else {k for k in ("nvs", "backview") if getattr(a, k)}
        profiles = parse_profiles(a.profiles or [p for p in DEFAULT_PROFILES if parse_profiles([p])[0].kind in given])
        missing = sorted({p.kind for p in profiles} - given)
        if missing:
            raise ValueError(f"profiles {[p.name for p in profiles if p.kind in missing]} need the {missing[0]} "
                             f"model: pass --{missing[0]} CKPT")
        opts = ExportOptions(opset=a.opset, precision="fp16" if a.fp16 else "fp32", exporter=a.exporter,
                             attention=a.attention or ("concat" if a.to == "trt" else "lse"), check=not a.no_check,
                             modules=tuple(a.modules) if a.modules else None, release_weights=a.release)
    except (ConfigError, ValueError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    try:                                    # before any model loads
        writable_dir(a.out, "export directory")
    except OSError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    rows = []
    # One model in memory at a time: the two full-size models together leave too little of a 24 GB
    # machine for tracing. Each kind's files are merged into the same manifest.
    for kind in [k for k in ("backview", "nvs") if any(p.kind == k for p in profiles)]:
        mine = [p for p in profiles if p.kind == kind]
        t0 = time.perf_counter()
        try:
            model, source = _load_model(a, kind)
        except (CheckpointError, ConfigError, ValueError) as e:
            print(f"export: {e}", file=sys.stderr)
            return 2
        print(f"loaded {kind} in {time.perf_counter() - t0:.1f} s; profiles: {', '.join(p.name for p in mine)}")
        try:
            _, r = export_models({kind: model}, a.out, mine, opts, {kind: source}, progress=not a.quiet)
        except ValueError as e:
            print(f"export: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # exporter / checker failures: report, non-zero exit
            print(f"export failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        rows += r
        del model
        gc.collect()
    print(format_summary(rows))
    print(f"manifest: {Path(a.out) / 'manifest.json'}")
    if a.to == "trt":
        return build_trt(a)
    return 0


def build_trt(a: argparse.Namespace, what: str = "export --to trt") -> int:
    """Build (or find in the cache) the TensorRT engine of every file of the export in ``a.out``
    with the :func:`add_trt_arguments` options; prints one row per engine, returns the exit code
    (2 when TensorRT, a GPU or the export is missing, or the precision needs quantized files).
    ``what`` starts the error messages."""
    from dp360rt.backends.manifest import ExportMismatchError
    from dp360rt.backends.trt_backend import TrtUnavailableError, build_engines
    try:
        rows = build_engines(a.out, precision=a.precision or "fp16", cache_dir=a.engines,
                             workspace_bytes=int(a.workspace_gib * 2 ** 30), log=print)
    except (TrtUnavailableError, NotImplementedError, FileNotFoundError, ExportMismatchError) as e:
        print(f"{what}: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"  {r['file']:<40} -> {r['engine']}  {r['bytes'] / 2**20:9.1f} MiB  {r['seconds']:7.1f} s"
              f"{'  (cached)' if r['cached'] else ''}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m dp360rt.export") -> int:
    """The ``export`` command on its own: parse ``argv`` (default ``sys.argv[1:]``), export; the exit code."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    configure(p)
    return run(p.parse_args(argv))


ENGINES_DESCRIPTION = "build the TensorRT engines of an existing export directory (cached under EXPORT_DIR/engines)"


def engines_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Engines for an export made earlier (``export --to trt`` without exporting again); the exit code."""
    p = argparse.ArgumentParser(prog=prog, description=ENGINES_DESCRIPTION)
    p.add_argument("out", metavar="EXPORT_DIR", help="an export directory (manifest.json, <kind>/*.onnx)")
    add_trt_arguments(p)
    return build_trt(p.parse_args(argv), what="trt engines")
