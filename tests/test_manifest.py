"""The full-size models have exactly the official keys, shapes and parameter counts."""
from __future__ import annotations

import json

import pytest

from conftest import FIXTURES
from dp360rt import build_model
from dp360rt.model import state_summary


@pytest.mark.parametrize("kind", ["nvs", "backview"])
def test_keys_and_shapes_match_manifest(kind):
    manifest = {}
    for line in (FIXTURES / f"manifest_{kind}_full.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        manifest[key] = shape
    sd = build_model(kind, "full", device="meta").state_dict()
    ours = {k: "x".join(str(d) for d in v.shape) for k, v in sd.items()}
    assert sorted(set(manifest) - set(ours)) == []
    assert sorted(set(ours) - set(manifest)) == []
    wrong = {k: (ours[k], manifest[k]) for k in manifest if ours[k] != manifest[k]}
    assert wrong == {}


@pytest.mark.parametrize("kind", ["nvs", "backview"])
def test_counts_match_summary(kind):
    expected = json.loads((FIXTURES / "manifest_summary.json").read_text())[kind]
    got = state_summary(build_model(kind, "full", device="meta"))
    for field in ("num_keys", "num_elements", "num_parameters", "keys_per_prefix", "elements_per_prefix"):
        assert got[field] == expected[field], field


def test_tiny_builtin_equals_fixture_config():
    from dp360rt.config import load_config
    from conftest import SET_A
    assert load_config("tiny") == load_config(SET_A)
