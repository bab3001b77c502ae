"""Whether our Triton kernels can run here, and how they are launched: the one place for both.

Triton is optional and nothing here imports it until a question needs it, so ``import dp360rt``
never does. A kernel runs on CUDA tensors, or on tensors of any device when Triton's CPU
interpreter is on (``TRITON_INTERPRET=1``, how the tests run the kernels without a GPU).

The interpreter trap: ``@triton.jit`` decides at decoration time whether a function is compiled
or interpreted, and ``triton.language``'s own helpers (``tl.sum``, ``tl.zeros``...) are decorated
when it is first imported. So ``TRITON_INTERPRET`` must be set before anything imports triton;
:func:`require` turns a late change into an error naming that fix instead of a crash
deep inside Triton.

Launching: on a GPU a kernel is autotuned over its configs; in the interpreter (where autotuning
is pointlessly slow) or when a caller fixes the tiles, the plain jit function runs with explicit
blocks (:class:`Kernel`).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

# What the attention kernels take; the dispatcher sends other inputs to the PyTorch twins.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def import_error() -> str | None:
    """Why ``triton`` (with ``triton.language``) cannot be imported here, or None when it can.
    The first call imports it."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no triton"
        return f"{type(e).__name__}: {e}"
    return None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter now (1/true/yes/on, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unavailable(device: torch.device | str) -> tuple[str, str] | None:
    """None when a Triton kernel can run on tensors on ``device``; else (what is missing, the fix),
    e.g. ``("triton cannot be imported (...)", "install triton")``."""
    err = import_error()
    if err is not None:
        return f"triton cannot be imported ({err})", "install triton"
    dev = torch.device(device)
    if dev.type != "cuda" and not interpreting():
        return (f"the tensors are on {dev.type!r}, not CUDA, and the Triton interpreter is off",
                "run on a CUDA device, set TRITON_INTERPRET=1 (slow, for testing)")
    return None


def can_run(device: torch.device | str) -> bool:
    """Whether a Triton kernel can run on tensors on ``device`` (CUDA, or any under the interpreter)."""
    return unavailable(device) is None


def interpreter_consistent(*kernels: Any) -> bool:
    """Whether ``triton.language`` and the given ``@triton.jit`` functions were decorated in the
    interpreter mode in force now (False when triton does not import)."""
    if import_error() is not None:
        return False
    import triton.language as tl
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - layout of another triton version: cannot tell
        return True
    other_mode = JITFunction if interpreting() else InterpretedFunction
    return not any(isinstance(f, other_mode) for f in (tl.sum, *kernels))


def require(device: torch.device | str, *kernels: Any) -> None:
    """Raise RuntimeError, naming the fix, unless ``kernels`` (``@triton.jit`` functions) can run
    on tensors on ``device``: triton imports, the device is CUDA or the interpreter is on, and
    ``TRITON_INTERPRET`` did not change after triton (or ``kernels``) was imported."""
    missing = unavailable(device)
    if missing is not None:
        raise RuntimeError(f"Triton kernel cannot run: {missing[0]}. Fix: {missing[1]}")
    if interpreter_consistent(*kernels):
        return
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported, so triton.language's own "
                           "jit helpers were compiled for a GPU and the interpreter cannot run them. Fix: set "
                           "TRITON_INTERPRET=1 before anything imports triton (e.g. in the environment)")
    raise RuntimeError("TRITON_INTERPRET was unset after triton was imported with it on, so the jit functions "
                       "were built for the interpreter and cannot be compiled. Fix: leave TRITON_INTERPRET as "
                       "it was when triton was imported")


class Kernel:
    """A ``@triton.jit`` function with its GPU autotune set-up.

    ``configs``: the ``triton.Config`` list to autotune over, ``key``: the argument names whose
    values pick a tuning, ``prune``: an ``early_config_prune`` hook or None. The autotuner is built
    on the first autotuned launch.
    """

    def __init__(self, fn: Any, configs: list, key: list[str], prune: Callable | None = None):
        self.fn = fn
        self.configs, self.key, self.prune = configs, key, prune
        self._tuned = None

    def autotuned(self) -> Any:
        """The autotuned launcher (GPU)."""
        if self._tuned is None:
            import triton
            prune = {"early_config_prune": self.prune} if self.prune is not None else None
            self._tuned = triton.autotune(configs=self.configs, key=self.key, prune_configs_by=prune)(self.fn)
        return self._tuned

    def __call__(self, grid: Callable[[dict], tuple], args: tuple, meta: dict,
                 blocks: dict[str, int] | None = None, **launch: int) -> None:
        """Launch over ``grid(blocks)`` (``grid`` maps the block sizes to the program grid).
        ``blocks=None``: autotuned; else the plain jit with these blocks and ``launch`` options
        (``num_warps``, ``num_stages``), which the interpreter does not take."""
        if blocks is None:
            self.autotuned()[grid](*args, **meta)
            return
        self.fn[grid(blocks)](*args, **meta, **blocks, **({} if interpreting() else launch))
