"""Results are complete or absent: output checked before any model loads, atomic files, a run's
folder moved into place whole with its manifest, no silent overwrite, readers refuse mixed runs,
finished work kept when the final write fails, disk-full errors naming the path."""
from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path

import pytest
import torch

from dp360rt.cli.main import main
from dp360rt.nerf.cameras import load_views, sphere32_cameras
from dp360rt.engine.generation import GenerationResult
from dp360rt.engine.pipeline import Pipeline
from dp360rt.io.results import IncompleteRunError, OutputError, save_or_keep


def _result(seed: int) -> GenerationResult:
    g = torch.Generator().manual_seed(seed)
    return GenerationResult(back_view=torch.rand(3, 8, 8, generator=g), views=torch.rand(32, 3, 8, 8, generator=g),
                            cameras=sphere32_cameras(), timings={"total": 1.0})


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def no_models(monkeypatch):
    """Any model or NeRF load fails the test: the output must be refused before."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the output location was checked")
    monkeypatch.setattr(Pipeline, "random", classmethod(boom))
    monkeypatch.setattr(Pipeline, "from_checkpoints", classmethod(boom))
    import dp360rt.nerf.model
    monkeypatch.setattr(dp360rt.nerf.model.Nerf, "load", classmethod(boom))


VERBS = {
    "generate": ["generate", "p.png", "--random", "tiny", "--out", "{out}"],
    "stream": ["stream", "p.png", "--random", "tiny", "--out", "{out}"],
    "bench": ["bench", "--random", "tiny", "--out", "{out}"],
    "demo": ["demo", "--out", "{out}"],
    "nerf render": ["nerf", "render", "model", "--cameras", "c.json", "--out", "{out}/sub"],
    "nerf video": ["nerf", "video", "model", "--out", "{out}/sub/v.mp4"],
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_output_checked_before_models_load(verb, tmp_path, no_models, capsys):
    taken = tmp_path / "taken"
    taken.write_text("an existing file")
    assert main([a.format(out=taken) for a in VERBS[verb]]) == 2
    err = capsys.readouterr().err
    assert str(taken) in err and "Fix: " in err and "model was loaded" not in err


def test_existing_result_refused_unless_overwrite(tmp_path, no_models, capsys):
    out = tmp_path / "out"
    _result(0).save(out)
    assert main(["generate", "p.png", "--random", "tiny", "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    with pytest.raises(OutputError, match="already holds files.*--overwrite"):
        _result(1).save(out)
    first = json.loads((out / "manifest.json").read_text())
    _result(1).save(out, overwrite=True)
    second = json.loads((out / "manifest.json").read_text())
    assert second["run_id"] != first["run_id"] and second["views"] == 32
    # replaced as a whole: every file is the second run's, nothing left beside the folder
    assert set(second["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    load_views(out)                                       # the manifest matches: accepted


def test_disk_full_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    from PIL import Image
    calls = []

    def full_disk(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 5:
            Path(fp).write_bytes(b"")                     # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *a, **k)
    real = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OutputError, match=r"cannot write .*003\.png: no space left on device\. Fix: free some space"):
        _result(0).save(tmp_path / "out")
    assert _all_files(tmp_path) == [] and list(tmp_path.iterdir()) == []    # no 0-byte file, no partial folder


def test_results_kept_when_the_final_write_fails(tmp_path):
    out = tmp_path / "taken"
    out.write_text("a file appeared where the results go")
    with pytest.raises(OutputError, match="The results are kept in ") as e:
        save_or_keep(lambda d: _result(0).save(d), out)
    kept = Path(str(e.value).split("The results are kept in ")[1].rstrip("."))
    assert (kept / "manifest.json").is_file() and len(list(kept.glob("0*.png"))) == 32
    load_views(kept)


def test_views_folder_of_mixed_runs_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _result(0).save(a)
    _result(1).save(b)
    (a / "005.png").write_bytes((b / "005.png").read_bytes())       # another run's view
    with pytest.raises(IncompleteRunError, match=r"005\.png differs from the run .*Fix: "):
        load_views(a)
    assert main(["nerf", "fit", str(a), "--out", str(tmp_path / "nerf"), "--steps", "1"]) == 2
    m = json.loads((b / "manifest.json").read_text())
    m["complete"] = False
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompleteRunError, match="incomplete run"):
        load_views(b)
    (b / "manifest.json").unlink()                        # a hand-made folder: accepted with a note
    with pytest.warns(UserWarning, match="no manifest.json"):
        load_views(b)


def test_interrupted_stream_keeps_the_earlier_result(tmp_path, monkeypatch):
    """Ctrl-C in the middle of `dp360rt stream` into a folder holding a result: that result stays
    as it was (no new views beside old ones), and no partial folder is left."""
    from dp360rt.io.images import synthetic_portrait
    from dp360rt.io.images import to_unit
    out, portrait = tmp_path / "out", tmp_path / "p.png"
    _result(0).save(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import dp360rt.io.images
    dp360rt.io.images.save_png(to_unit(synthetic_portrait(64))[0], portrait)
    real, n = dp360rt.io.images.save_png, []

    def interrupt(image, path):
        n.append(path)
        if len(n) == 3:
            raise KeyboardInterrupt
        real(image, path)
    monkeypatch.setattr(dp360rt.io.images, "save_png", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(["stream", str(portrait), "--random", "tiny", "--out", str(out), "--overwrite", "--steps", "1"])
    assert len(n) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.png"]
