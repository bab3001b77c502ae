"""The fast exact engine: the reference's numbers with only the unavoidable work.

Per denoising step (all windows in lockstep):
1. the appearance net runs once, at batch 1 per reference (front and back together), and stops
   after its last bank write; the bank's keys/values are projected once per layer
   (:class:`~dp360rt.unet.bank.SharedBank`) and read by every frame of every window;
2. the pose ControlNet runs for the conditional rows only (the reference discards it for the
   unconditional branch);
3. conditional and unconditional rows of up to all windows go through one UNet call
   (:class:`~dp360rt.sampler.plan.BatchPlan` decides how many fit the memory budget);
   every network call goes through an execution backend (:mod:`dp360rt.backends`);
4. the DDIM update is applied per window with that window's own recorded noises, so the draws
   and thus the numbers equal the reference loop's.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..model import DiffPortrait360
from ..backends.base import Backend
from ..backends.torch_backend import TorchBackend
from .ddim import ddim_tables
from .plan import BatchPlan
from .reference import q_sample_999
from .tasks import BankCache, Task, step_tasks
from .windows import Window


def write_shared_bank(backend: Backend, refs: list[Tensor], t: Tensor, context: Tensor) -> list[Tensor]:
    """Bank entries at batch 1: the appearance net on all references at once (one row each),
    stopped after its last write; each entry is ``[1, R*HW, C]`` (front tokens, then back).

    refs: R latents [1, 4, h, w]; t: [1]; context: [1, 77, C].
    """
    r = len(refs)
    entries = backend.appearance(torch.cat(refs), t.expand(r), context.expand(r, -1, -1))
    return [e.reshape(1, r * e.shape[1], e.shape[2]) for e in entries]


def window_task(model: DiffPortrait360, win, key, refs: list[Tensor], context: Tensor, tables,
                record: bool = False) -> Task:
    """A sampling task for one window: its start latent drawn from the window's own noises
    (start draw, then the q_sample draw when a feature latent gives the 3D-aware start)."""
    f, _, hh, ww = win.hint.shape
    shape = (f, model.cfg.unet.in_channels, hh // 8, ww // 8)
    x = win.noise(shape, win.hint.device)
    if win.feature_latent is not None:
        x = q_sample_999(model, win.feature_latent, win.noise(shape, win.hint.device))
    return Task(key=key, x=x, hint=win.hint, refs=refs, context=context, tables=tables, noise=win.noise,
                record=[(x, x)] if record else None)


@torch.no_grad()
def sample_windows_fast(model: DiffPortrait360, windows: list[Window], *, context: Tensor, ref_front: Tensor,
                        ref_back: list[Tensor], steps: int, eta: float, cfg_scale: float,
                        plan: BatchPlan | None = None, backend: Backend | None = None,
                        progress: Callable[[int, int], None] | None = None,
                        record: list[tuple[Tensor, Tensor]] | None = None) -> tuple[list[Tensor], int]:
    """Sample all windows together; same signature and results as the reference engine.

    windows: :class:`~dp360rt.sampler.windows.Window` list (hints [F, 3, H, W], optional feature latent,
    recorded noises in the reference order); context: [1, 77, C]; ref_front and each ref_back:
    [1, 4, h, w]. Returns (final latents per window, UNet calls). ``record`` collects
    ``(x, pred_x0)`` of all windows after every step, and ``(x_T, x_T)`` first.
    """
    if not windows:
        return [], 0
    plan = plan or BatchPlan(windows_per_call=len(windows), batch_cfg=True)
    backend = backend or TorchBackend(model)
    tables = ddim_tables(model.alphas_cumprod, steps, eta)
    refs = [ref_front[:1]] + [r[:1] for r in ref_back]
    tasks = [window_task(model, win, 0, refs, context[:1], tables, record is not None) for win in windows]
    cache, calls = BankCache(), 0
    for n in range(tables.steps):
        for s in range(0, len(tasks), plan.windows_per_call):
            calls += step_tasks(backend, tasks[s:s + plan.windows_per_call], cfg_scale, plan.batch_cfg, cache)
        cache.drop(0, tasks[0].timestep if not tasks[0].done else None)
        if progress is not None:
            progress(n + 1, tables.steps)
    if record is not None:
        for k in range(tables.steps + 1):
            record.append(tuple(torch.cat([t.record[k][j] for t in tasks]) for j in range(2)))
    return [t.x for t in tasks], calls


def _single_reference(ref: Tensor, what: str) -> Tensor:
    """The fast engine holds one reference per request; a batch of repeats collapses to row 0."""
    if ref.shape[0] > 1 and not bool((ref == ref[:1]).all()):
        raise ValueError(f"{what}: the fast engine shares one reference across the batch, but the rows differ; "
                         "use engine='reference' for per-sample references")
    return ref[:1]


@torch.no_grad()
def apply_fast(model: DiffPortrait360, x: Tensor, t: Tensor, context: Tensor, hint: Tensor,
               ref_front: Tensor | None, ref_back: list[Tensor], backend: Backend | None = None):
    """One denoiser call through the fast path, for checking against the reference ``apply_model``.

    With ``ref_front``: conditional branch (shared bank at batch 1, pose residuals); without:
    unconditional branch (no bank, no pose pass). Every network runs on ``backend`` (default: the
    model's PyTorch modules). Returns an :class:`~dp360rt.model.ApplyOutput` whose ``bank`` is
    expanded (a view) over the batch for comparison.
    """
    from ..model import ApplyOutput
    be = backend or TorchBackend(model)
    if ref_front is None:
        return ApplyOutput(eps=be.unet(x, t, context, None, None, cond_rows=0), bank=None, pose_residuals=[])
    if not bool((t == t[:1]).all()) or not bool((context == context[:1]).all()):
        raise ValueError("the fast engine's shared bank needs one timestep and one text context per request")
    refs = [_single_reference(ref_front, "ref_front")] + [_single_reference(r, "ref_back") for r in ref_back]
    entries = write_shared_bank(be, refs, t[:1], context[:1])
    pose = be.pose(x, hint, t, context)
    eps = be.unet(x, t, context, be.bank(entries), pose, cond_rows=x.shape[0])
    return ApplyOutput(eps=eps, bank=[e.expand(x.shape[0], -1, -1) for e in entries], pose_residuals=pose)


def sample_fast_recorded(model: DiffPortrait360, inp: dict, ref_back: list[Tensor], noise, *,
                         plan: BatchPlan | None = None, backend: Backend | None = None):
    """Run one fixture DDIM case through the fast engine (on ``backend``, default the PyTorch
    modules); returns a reference-like SampleResult."""
    from .reference import SampleResult
    lat = tuple(int(v) for v in inp["latent_hw"])
    hint = inp["hint"]
    if (hint.shape[2] // 8, hint.shape[3] // 8) != lat:
        raise ValueError(f"hint {tuple(hint.shape)} does not match latent size {lat}")
    win = Window(0, hint, inp.get("feature_latent"), noise)
    rec: list[tuple[Tensor, Tensor]] = []
    (z,), calls = sample_windows_fast(
        model, [win], context=_single_reference(inp["context"], "context"),
        ref_front=_single_reference(inp["ref_front"], "ref_front"),
        ref_back=[_single_reference(r, "ref_back") for r in ref_back], steps=int(inp["steps"]),
        eta=float(inp["eta"]), cfg_scale=float(inp["cfg_scale"]), record=rec, plan=plan, backend=backend)
    tables = ddim_tables(model.alphas_cumprod, int(inp["steps"]), float(inp["eta"]))
    return SampleResult(latent=z, x_T=rec[0][0], tables=tables, x_steps=[r[0] for r in rec[1:]],
                        pred_x0_steps=[r[1] for r in rec[1:]], unet_calls=calls)
