"""The application builder a Ray Serve config file names (KubeRay's ``serveConfigV2``, ``serve deploy``).

    applications:
      - name: dp360rt
        route_prefix: /
        import_path: dp360rt.serve.ray_config:app
        args: {nvs: /models/model_state-340000.th, backview: /models/back_head-230000.th,
               conditions: /models/cam_condition/sphere32, device: cuda, replicas: 2}

``args`` takes the options of ``dp360rt serve`` by name (``max_queue`` or ``max-queue``: a value, a
list for a repeatable option, true for a flag) and builds what ``dp360rt serve --ray`` runs: the same
checks, the same pipeline spec, :func:`~dp360rt.serve.ray_app.build_app`. Where to listen is the
config's ``http_options`` and which cluster is the one that deploys it, so ``host``, ``port``,
``ray`` and ``ray_address`` are refused. Building the application does not start Ray.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

NOT_ARGS = {"host": "http_options.host", "port": "http_options.port", "ray": None, "ray_address": None,
            "fn": None, "help": None}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):             # a ValueError for the deploy's status, never sys.exit
        raise ValueError(f"dp360rt serve config args: {message}")


def _serve_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the root parser, its ``serve`` subparser), built by the CLI's own ``add_parser``."""
    from .cli import add_parser
    root = _Parser(prog="dp360rt")
    sub = root.add_subparsers(dest="command")
    add_parser(sub)
    return root, sub.choices["serve"]


def serve_namespace(args: Mapping[str, Any] | None) -> argparse.Namespace:
    """``args`` (a Serve config's ``args`` mapping) -> the namespace ``dp360rt serve --ray`` would
    parse, checked as the CLI checks it (``ValueError`` and the CLI's errors say what is wrong)."""
    root, serve_parser = _serve_parser()
    actions = {a.dest: a for a in serve_parser._actions if a.option_strings}
    argv = ["serve", "--ray"]
    for key, value in (args or {}).items():
        dest = str(key).replace("-", "_")
        if dest in NOT_ARGS:
            where = NOT_ARGS[dest]
            raise ValueError(f"dp360rt serve config args: {key!r} is not an application argument"
                             + (f"; set {where} in the Serve config" if where else ""))
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(d for d in actions if d not in NOT_ARGS))
            raise ValueError(f"dp360rt serve config args: unknown argument {key!r}. Known: {known}")
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:                  # store_true
            if not isinstance(value, bool):
                raise ValueError(f"dp360rt serve config args: {key!r} is a flag: true or false, not {value!r}")
            if value:
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            if not isinstance(action, argparse._AppendAction):
                raise ValueError(f"dp360rt serve config args: {key!r} takes one value, not a list")
            for v in value:
                argv += [flag, str(v)]
        elif isinstance(value, Mapping):
            raise ValueError(f"dp360rt serve config args: {key!r} takes a value, not a mapping")
        else:
            argv += [flag, str(value)]
    ns = root.parse_args(argv)
    from .cli import check_args
    check_args(ns)
    return ns


def app(args: dict[str, Any]):
    """The Ray Serve application of ``dp360rt serve --ray`` built from ``args`` (see the module doc)."""
    from .parts import pipeline_spec
    from .ray_app import app_from_args
    a = serve_namespace(args)
    return app_from_args(a, pipeline_spec(a))
