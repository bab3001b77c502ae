"""PanoHead generator: fixture cases (set A), the restricted pickle reader, conversion, named
errors, orbit conditions feeding the pipeline. Tolerances: the fixture README's (cases.pt _meta)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from dp360rt.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from dp360rt.cli.main import main
from dp360rt.model import build_model
from dp360rt.panohead.cameras import diffportrait_orbit, orbit
from dp360rt.panohead.configs import load_spec
from dp360rt.panohead.pickle_reader import UnsafePickleError, read_network_pickle
from dp360rt.panohead.verify import compare, compute_case, materialize_pickle
from dp360rt.panohead import PanoHeadCheckpointError
from dp360rt.panohead.weights import (build_generator, fixture_spec, generator_from_state,
                                      load_generator, read_safetensors, recipe_state_dicts)

PH = Path(__file__).parent / "fixtures" / "panohead"
# A synth_* case renders a 512x512 super-resolution at PanoHead's hard-coded widths (about 5 s on 2
# cores), so the suite runs one frontal and one low, pivoted camera; `dp360rt panohead verify
# tests/fixtures/panohead` recomputes all 12 cases, the projector's 3 steps included (benchmarks/RESULTS.md).
CASES = ["mapping", "planes", "orbit32_cameras", "forward", "synth_orbit00", "synth_low_back_pivot"]


@pytest.fixture(scope="module")
def ph_cases():
    return torch.load(PH / "cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def ph_recipe():
    return recipe_state_dicts(PH, models=("G_ema", "G", "D"))


@pytest.fixture(scope="module")
def ph_g(ph_recipe):
    return generator_from_state(fixture_spec(PH), ph_recipe["G_ema"], "recipe")


@pytest.fixture(scope="module")
def ph_pickle(tmp_path_factory, ph_recipe):
    p = tmp_path_factory.mktemp("panohead") / "network-snapshot.pkl"
    p.write_bytes(materialize_pickle(PH, ph_recipe))
    return p


@pytest.mark.parametrize("name", CASES)
def test_set_a_case(ph_g, ph_cases, name):
    meta = ph_cases["_meta"]
    row = compare(name, compute_case(ph_g, name, ph_cases[name], meta), ph_cases[name]["outputs"],
                  meta["tolerance"][name])
    assert row.ok, row.message
    assert row.rel <= row.tol


def test_default_orbit_is_the_authors(ph_cases):
    # the literal-3.14 sphere32 cameras, within the inputs-side tolerance 1e-5
    ref = ph_cases["orbit32_cameras"]["outputs"]["c"].double()
    assert (orbit().float().double() - ref).abs().max() / ref.abs().max() <= 1e-5
    assert torch.equal(orbit(), diffportrait_orbit())
    custom = orbit(8, -90, 90, elevation_deg=10, radius=2.6)
    pos = custom[:, [3, 7, 11]]
    assert torch.allclose(pos.norm(dim=1), torch.full((8,), 2.6, dtype=torch.float64))
    import math
    assert torch.allclose(pos[:, 1], torch.full((8,), 2.6 * math.sin(math.radians(10)), dtype=torch.float64))  # world +y is up
    assert torch.allclose(torch.atan2(pos[:, 0], pos[:, 2]),                 # yaw 0 = front (+z), 90 = +x side
                          torch.tensor([math.radians(-90 + 22.5 * k) for k in range(8)], dtype=torch.float64))


def test_pickle_reader_equals_recipe(ph_pickle, ph_recipe):
    snap = read_network_pickle(ph_pickle)
    assert set(snap.objects) == {"training_set_kwargs", "G", "D", "G_ema", "augment_pipe"}
    for model in ("G_ema", "G", "D"):
        sd = snap.state_dict(model)
        buffers = torch.load(PH / "buffers.pt", weights_only=True)[model]
        ref = dict(ph_recipe[model], **buffers)
        assert set(sd) == set(ref)
        assert all(torch.equal(sd[k], ref[k]) for k in ref), model
    assert snap.spec("G_ema") == fixture_spec(PH)
    # module sources are hashed, never run: the visible set's placeholders
    assert len(set(snap.source_hashes().values())) == 6


def test_convert_pickle_to_safetensors(ph_pickle, ph_recipe, tmp_path, capsys):
    out = tmp_path / "ph.safetensors"
    assert main(["convert", str(ph_pickle), str(out)]) == 0
    assert "nothing in the pickle was executed" in capsys.readouterr().out
    sd, spec = read_safetensors(out)
    assert spec == fixture_spec(PH)
    assert all(torch.equal(sd[k], v) for k, v in ph_recipe["G_ema"].items())
    g = load_generator(out)
    assert g.neural_rendering_resolution == 16 and g.rendering_kwargs["density_noise"] == 0
    assert not list(tmp_path.glob(".*tmp"))          # no partial file left behind


def test_verify_cli_perturbed_and_projector(tmp_path, ph_cases, capsys):
    # a cheap copy of the set: weights as template + recipe, cases without the synth_* renders
    d = tmp_path / "set"
    d.mkdir()
    for f in ("init.json", "buffers.pt", "G_ema_init_kwargs.json", "network-snapshot.fill.json",
              "network-snapshot.template.pkl.xz"):
        shutil.copy(PH / f, d / f)
    # (the projector case is covered: its golden steps run in test_invert.py::test_projector_golden_steps)
    small = {k: v for k, v in ph_cases.items() if k in ("mapping", "orbit32_cameras", "projector", "_meta")}
    torch.save(small, d / "cases.pt")
    assert main(["panohead", "verify", str(d), "--skip", "projector"]) == 0
    out = capsys.readouterr().out
    assert "weights:pkl(template)" in out and "weights:recipe" in out and "FAIL" not in out
    assert "projector" not in out.split("result", 1)[1]                 # skipped: no row

    bad = {k: dict(v) for k, v in small.items() if k != "_meta"}
    bad["_meta"] = small["_meta"]
    bad["mapping"]["outputs"] = dict(small["mapping"]["outputs"])
    ws = bad["mapping"]["outputs"]["ws_trunc"].clone()
    ws[0, 3, 7] += 1e-3 * ws.abs().max()                                # 1e-3 relative, tolerance 1e-5
    bad["mapping"]["outputs"]["ws_trunc"] = ws
    torch.save(bad, d / "cases.pt")
    assert main(["panohead", "verify", str(d), "--skip", "projector"]) == 1
    out = capsys.readouterr().out
    assert "mapping" in out and "ws_trunc" in out and "FAILED: mapping" in out


# -- hostile and foreign files -----------------------------------------------------------------------

class _WritesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Shell:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [_WritesFile, _Shell])
def test_reduce_payload_refused_nothing_written(tmp_path, payload):
    target = tmp_path / "pwned"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"G_ema": payload(target)}, protocol=4))
    with pytest.raises(UnsafePickleError, match="refers to the Python global .*nothing was executed. Fix"):
        read_network_pickle(p)
    with pytest.raises(UnsafePickleError):
        load_generator(p)
    assert not target.exists()


class _Persistent:
    """Pickles like StyleGAN's persistence: a REDUCE of _reconstruct_persistent_obj(meta)."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (_reconstruct, (self.meta,))


def _reconstruct(meta):
    raise AssertionError("never called")


_reconstruct.__module__, _reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"


def _evil_source(target) -> str:
    return f"open({str(target)!r}, 'w').write('ran')\n"


def test_unknown_persistent_class_refused_source_not_run(tmp_path, monkeypatch):
    import sys
    import types
    mod = types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    target = tmp_path / "pwned"
    meta = {"type": "class", "version": 6, "module_src": _evil_source(target), "class_name": "Pwn", "state": {}}
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"G_ema": _Persistent(meta)}, protocol=4))
    with pytest.raises(UnsafePickleError, match="persistent class 'Pwn' is not one of PanoHead's; its embedded source "
                                                "was not run"):
        read_network_pickle(p)
    assert not target.exists()


def test_hostile_module_source_is_never_executed(tmp_path, ph_pickle, ph_recipe, monkeypatch):
    """The genuine snapshot with a module source that writes a file (PanoHead's loader would run it)."""
    data = ph_pickle.read_bytes()
    placeholder = b"# source omitted (training.triplane)\n"
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "p"
    code = b"open('p','w')#"
    assert len(code) <= len(placeholder) and data.count(placeholder) == 1
    p = tmp_path / "hostile_source.pkl"
    p.write_bytes(data.replace(placeholder, code.ljust(len(placeholder), b"x")))
    g = load_generator(p)
    assert not target.exists()
    assert torch.equal(g.state_dict()["decoder.net.0.weight"], ph_recipe["G_ema"]["decoder.net.0.weight"])


def test_truncated_empty_and_missing_pickles(tmp_path, ph_pickle):
    data = ph_pickle.read_bytes()
    for n in (100, len(data) // 2, len(data) - 3):
        p = tmp_path / f"cut{n}.pkl"
        p.write_bytes(data[:n])
        with pytest.raises(PanoHeadCheckpointError, match="truncated or corrupted. Fix: download it again"):
            read_network_pickle(p)
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(PanoHeadCheckpointError, match="is empty"):
        read_network_pickle(tmp_path / "empty.pkl")
    with pytest.raises(PanoHeadCheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pkl")
    cut = tmp_path / "cut.safetensors"
    shutil.copy(ph_pickle, cut)
    with pytest.raises(PanoHeadCheckpointError, match="could not be read as .safetensors"):
        load_generator(cut)


def test_diffportrait_checkpoint_given_as_panohead_and_reverse(tmp_path, ph_pickle, capsys):
    dp = tmp_path / "model_state-340000.th"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, dp)
    with pytest.raises(PanoHeadCheckpointError, match="is a DiffPortrait360 checkpoint .*not a PanoHead network pickle"):
        load_generator(dp)
    assert main(["conditions", "--orbit", "--panohead", str(dp), "--out", str(tmp_path / "c")]) == 2
    assert "DiffPortrait360 checkpoint" in capsys.readouterr().err and not (tmp_path / "c").exists()

    with pytest.raises(CheckpointError, match="is a PanoHead network pickle, not a DiffPortrait360 checkpoint. Fix"):
        read_state_dict(ph_pickle)
    st = tmp_path / "ph.safetensors"
    assert main(["convert", str(ph_pickle), str(st)]) == 0
    with pytest.raises(CheckpointError, match="is a PanoHead generator, not a DiffPortrait360 checkpoint"):
        load_checkpoint(build_model("nvs", "tiny", device="meta"), st)


# -- generator API, full-size shapes, conditions ------------------------------------------------------

def test_full_size_counts_match_manifest(capsys):
    summary = json.loads((PH / "manifest_panohead_summary.json").read_text())["G_ema"]
    g = build_generator(load_spec("full"), device="meta")
    sd = g.state_dict()
    rows = [ln.split("\t") for ln in (PH / "manifest_panohead_full.tsv").read_text().splitlines() if ln]
    manifest = {r[0]: tuple(int(x) for x in r[1].split("x")) if r[1] else () for r in rows if r[0] != "key"}
    assert {k: tuple(v.shape) for k, v in sd.items()} == manifest
    assert main(["info", "--config", "tiny", "--panohead"]) == 0
    out = capsys.readouterr().out
    assert f"{summary['num_keys']:>6} {summary['num_elements']:>15,}" in out
    for prefix, n in summary["elements_per_prefix"].items():
        assert f"{n:,}" in out, prefix


def test_randomness_is_seeded_and_generator_differentiable():
    g = build_generator(load_spec("tiny"))
    c = diffportrait_orbit([3]).float()
    ws = g.mapping(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), c, 0.7, 14)
    with torch.no_grad():
        a = g.synthesis(ws, c, noise_mode="random", draws=5)["image_raw"]
        b = g.synthesis(ws, c, noise_mode="random", draws=5)["image_raw"]
        d = g.synthesis(ws, c, noise_mode="random", draws=6)["image_raw"]
    assert torch.equal(a, b) and not torch.equal(a, d)
    w = ws.detach().clone().requires_grad_(True)
    out = g.synthesis(w, c, noise_mode="const", draws=0)
    (out["image"].mean() + out["image_raw"].mean()).backward()
    assert w.grad is not None and bool(torch.isfinite(w.grad).all()) and float(w.grad.abs().sum()) > 0


def test_custom_orbit_conditions_feed_the_pipeline(tmp_path, capsys):
    """A 32-view condition set for a custom orbit (tiny random PanoHead), then a generation from it."""
    out = tmp_path / "cond"
    args = ["conditions", "--orbit", "--random", "tiny", "--yaw-range", "-45", "315", "--elevation", "8",
            "--radius", "2.6", "--out", str(out)]
    assert main(args) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == [f"{i:07d}.png" for i in range(32)]
    cams = json.loads((out / "cameras.json").read_text())["views"]
    expect = orbit(32, -45, 315, elevation_deg=8, radius=2.6)
    assert [v["file"] for v in cams] == files
    assert torch.allclose(torch.tensor([v["camera"] for v in cams], dtype=torch.float64), expect)
    from dp360rt.io.images import load_conditions
    imgs = load_conditions(out, 64)
    assert imgs.shape == (32, 3, 64, 64) and float(imgs.std(0).mean()) > 0      # views differ

    from dp360rt.io.images import synthetic_portrait
    from dp360rt.engine.pipeline import Pipeline
    pipe = Pipeline.random("tiny", seed=0)
    res = pipe(synthetic_portrait(pipe.image_size), out, steps=2, seed=0)
    assert res.views.shape[0] == 32
    assert torch.allclose(torch.as_tensor(res.cameras, dtype=torch.float64), expect)

    assert main(args[:-1] + [str(tmp_path / "bad"), "--lookat", "0,0"]) == 2
    assert "--lookat '0,0': expected 3 comma-separated numbers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
