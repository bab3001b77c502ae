"""Shared fixtures: the setA golden cases and tiny models rebuilt from its seeded recipe."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dp360rt.checkpoint import load_checkpoint, materialize_recipe
from dp360rt.model import build_model

# CI runs two pytest-xdist workers on two cores: each computes on one thread (and so do the
# processes its tests start), or the two would oversubscribe the CPU and stall each other's teams.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
SET_A = FIXTURES / "setA"


@pytest.fixture(scope="session")
def cases():
    return torch.load(SET_A / "cases.pt", weights_only=True)


@pytest.fixture(scope="session")
def recipe():
    return {k: materialize_recipe(SET_A, k) for k in ("nvs", "backview")}


@pytest.fixture(scope="session")
def models(recipe):
    out = {}
    for kind in ("nvs", "backview"):
        m = build_model(kind, SET_A)
        load_checkpoint(m, recipe[kind])
        out[kind] = m
    return out


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (the fixtures' README metric)."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
