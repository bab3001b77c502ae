"""One denoising step of several independent sampling tasks in shared network calls.

A task is one batch of latents sampled together (the back view, or one 8-frame window of a
request) with its own DDIM table position and recorded noises. Tasks of one model can share a
step whatever their timesteps: each (request, timestep) pair gets its own bank group, rows carry
their own timesteps, and the DDIM update uses each task's own coefficients, so the numbers equal
sampling every task on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch
from torch import Tensor

from ..backends.base import Backend
from .ddim import DDIMTables
from .noise import RecordedNoise
from .reference import ddim_step


@dataclass
class Task:
    """x: [F, 4, h, w] current latents; hint: [F, 3, 8h, 8w]; refs: R reference latents [1, 4, h, w];
    context: [1, 77, C]; ``step`` counts steps taken (table index = steps - 1 - step)."""

    key: Hashable                 # identifies the request (tasks of one request share its bank)
    x: Tensor
    hint: Tensor
    refs: list[Tensor]
    context: Tensor
    tables: DDIMTables
    noise: RecordedNoise
    step: int = 0
    record: list[tuple[Tensor, Tensor]] | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.tables.steps

    @property
    def table_index(self) -> int:
        return self.tables.steps - 1 - self.step

    @property
    def timestep(self) -> int:
        return int(self.tables.timesteps[self.table_index])


@dataclass
class BankCache:
    """Bank entries per (request, timestep), computed once and reused by every call that reads them."""

    entries: dict[tuple[Hashable, int], list[Tensor]] = field(default_factory=dict)

    def drop(self, key: Hashable, below_or_at: int | None = None) -> None:
        """Forget a request's entries (all, or those of timesteps no task will visit again)."""
        for k in [k for k in self.entries if k[0] == key and (below_or_at is None or k[1] > below_or_at)]:
            del self.entries[k]


def _group_entries(backend: Backend, tasks: list[Task], cache: BankCache) -> list[list[Tensor]]:
    """Entries ([1, R*HW, C] each) for every (request, t) group of the batch; missing groups are
    written in one appearance call over all their references."""
    keys = list(dict.fromkeys((t.key, t.timestep) for t in tasks))
    missing = [k for k in keys if k not in cache.entries]
    if missing:
        first = {(t.key, t.timestep): t for t in tasks}
        refs, ts, ctx = [], [], []
        for k in missing:
            task = first[k]
            refs += task.refs
            ts += [k[1]] * len(task.refs)
            ctx += [task.context] * len(task.refs)
        out = backend.appearance(torch.cat(refs), torch.tensor(ts, device=refs[0].device), torch.cat(ctx))
        r = len(first[missing[0]].refs)
        for g, k in enumerate(missing):
            cache.entries[k] = [e[g * r:(g + 1) * r].reshape(1, r * e.shape[1], e.shape[2]) for e in out]
    return [cache.entries[k] for k in keys]


def step_tasks(backend: Backend, tasks: list[Task], cfg_scale: float, batch_cfg: bool = True,
               cache: BankCache | None = None) -> int:
    """Advance every task by one DDIM step in shared calls; returns the number of UNet calls.

    Nothing is written back until every network call succeeded, so a failing batch leaves all
    tasks as they were (the caller may retry them separately).
    """
    cache = cache if cache is not None else BankCache()
    groups = list(dict.fromkeys((t.key, t.timestep) for t in tasks))
    tasks_sorted = [t for g in groups for t in tasks if (t.key, t.timestep) == g]   # bank groups contiguous
    entries = _group_entries(backend, tasks_sorted, cache)
    bank = backend.bank([torch.cat(es) for es in zip(*entries)])
    rows = [sum(t.x.shape[0] for t in tasks_sorted if (t.key, t.timestep) == g) for g in groups]
    x = torch.cat([t.x for t in tasks_sorted])
    dev = x.device
    tt = torch.cat([torch.full((t.x.shape[0],), t.timestep, dtype=torch.long, device=dev) for t in tasks_sorted])
    ctx = torch.cat([t.context.expand(t.x.shape[0], -1, -1) for t in tasks_sorted])
    hint = torch.cat([t.hint for t in tasks_sorted])
    b = x.shape[0]
    pose = backend.pose(x, hint, tt, ctx)
    if cfg_scale == 1.0:
        eps, calls = backend.unet(x, tt, ctx, bank, pose, cond_rows=rows), 1
    else:
        if batch_cfg:
            e = backend.unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([ctx, ctx]), bank, pose, cond_rows=rows)
            e_c, e_u, calls = e[:b], e[b:], 1
        else:
            e_c = backend.unet(x, tt, ctx, bank, pose, cond_rows=rows)
            e_u, calls = backend.unet(x, tt, ctx, None, None, cond_rows=0), 2
        eps = e_u + cfg_scale * (e_c - e_u)
    new = []
    s = 0
    for t in tasks_sorted:
        n = t.x.shape[0]
        new.append(ddim_step(t.x, eps[s:s + n], t.tables, t.table_index, t.noise(t.x.shape, dev)))
        s += n
    for t, (x_next, pred_x0) in zip(tasks_sorted, new):
        t.x = x_next
        t.step += 1
        if t.record is not None:
            t.record.append((x_next, pred_x0))
    return calls
