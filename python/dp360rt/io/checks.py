"""Checks of plain option values (counts, sizes, budgets, devices, output places) shared by the
Python API and the command line, so both refuse the same values with the same message.

Every check returns the value in its canonical type or raises :class:`ArgumentError` (a
``ValueError``) naming the option, the value and a fix. :func:`arg` adapts a check to an
``argparse`` ``type=`` so the command line refuses a bad value before any work (exit 2).
"""
from __future__ import annotations

import argparse
import math
import numbers
from pathlib import Path
from typing import Any, Callable

import torch


class ArgumentError(ValueError):
    """An option value out of its range or of the wrong type; the message names it and the fix."""


def positive_int(value: Any, name: str, maximum: int | None = None, minimum: int = 1) -> int:
    """``value`` as an int in ``[minimum, maximum]``; bools, fractions and text are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
                and float(value).is_integer():
            value = int(value)
        else:
            raise ArgumentError(f"{name} must be a whole number, got {value!r}. Fix: pass an integer "
                                f">= {minimum}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        span = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ArgumentError(f"{name} must be {span}, got {value}. Fix: pass a value {span}")
    return value


def positive_float(value: Any, name: str, maximum: float | None = None) -> float:
    """``value`` as a finite float > 0 (and <= ``maximum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a number, got {value!r}. Fix: pass a positive number")
    value = float(value)
    if not math.isfinite(value) or value <= 0 or (maximum is not None and value > maximum):
        span = f"in (0, {maximum:g}]" if maximum is not None else "a finite number > 0"
        raise ArgumentError(f"{name} must be {span}, got {value}. Fix: pass a value {span}")
    return value


def max_memory_bytes(value: Any, name: str = "max_memory") -> int | None:
    """A memory budget in bytes: None or 0 mean no limit (the same on the API and the command
    line); otherwise a finite number > 0. Returns None for no limit, else whole bytes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) < 0:
        unit = "GiB" if name.startswith("--") else "bytes"
        raise ArgumentError(f"{name}={value!r} is not a memory budget. Fix: pass a finite number of {unit} > 0, "
                            "or 0 / leave it out for no limit")
    return int(value) or None


def gib_budget(value: Any, name: str = "--max-memory") -> float:
    """``--max-memory`` on the command line: GiB, a finite number >= 0 (0: no limit)."""
    max_memory_bytes(value, name)
    return float(value)


def device(name: Any, what: str = "device") -> torch.device:
    """A torch device this process can use (``cpu``, ``cuda``, ``cuda:N``); refuses unknown
    strings and CUDA on a CPU-only torch or a machine without that GPU."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(f"unknown {what} {name!r}. Fix: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    if dev.type != "cuda":
        raise ArgumentError(f"{what} {name!r} is not supported: dp360rt runs on cpu or cuda. Fix: use cpu or cuda")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible to this process")
        raise ArgumentError(f"{what} {name!r} asked for a GPU but {why} (torch {torch.__version__}). "
                            "Fix: use --device cpu (device='cpu'), or install a CUDA build of torch on a GPU machine")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ArgumentError(f"{what} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s). "
                            f"Fix: use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    return dev


def device_name(name: Any, what: str = "device") -> str:
    """:func:`device` as text (``"cpu"``, ``"cuda:1"``): what configs saved as JSON hold."""
    return str(device(name, what))


def writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create ``path`` (with parents) and prove a file can be written there; else an ``OSError``
    naming the place and the fix. Returns the path."""
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".dp360rt_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to the {what} {d} ({e.strerror or e}). Fix: choose a writable location "
                      "(an existing folder you may write to, not a path under a file)") from None
    return d


def arg(check: Callable[..., Any], *args: Any, convert: Callable[[str], Any] | None = None, **kw: Any
        ) -> Callable[[str], Any]:
    """``argparse`` ``type=`` from a check: ``arg(positive_int, "--steps")`` parses the text
    (int, or ``convert``) and applies the check; argparse prints its message and exits 2."""
    def parse(text: str) -> Any:
        value: Any = text
        try:
            value = (convert or _number)(text)
        except ValueError:
            pass                       # the check names the bad text
        try:
            return check(value, *args, **kw)
        except ArgumentError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = check.__name__    # argparse names the type in its messages
    return parse


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)
