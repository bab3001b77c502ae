"""dp360rt's offline export toolchain (not part of the runtime: only the CLI's ``export`` verb imports it, and onnx loads inside its handler).

* :func:`dp360rt.export.onnx_export.export_models` - static-shape ONNX files + ``manifest.json``;
* :mod:`dp360rt.export.profiles` - the named shape profiles (``window8``, ``window8x2cfg``, ``batch32``, ``backview``);
* :mod:`dp360rt.export.cli` - the ``export`` subcommand (``python -m dp360rt.export ...``);
* :mod:`dp360rt.export.fixture` - a fixture set's models exported for ``dp360rt verify --backend ort|trt``.

Importing this package is cheap: onnx and the exporter load when an export runs.
"""
from .profiles import BUILTIN_PROFILES, DEFAULT_PROFILES, Profile, parse_profile, parse_profiles

__all__ = ["BUILTIN_PROFILES", "DEFAULT_PROFILES", "Profile", "parse_profile", "parse_profiles"]
