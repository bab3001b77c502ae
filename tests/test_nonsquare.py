"""Non-square latents (16x24, images 128x192): the fast engine on torch and on ONNX Runtime give the
reference engine's numbers on a fixture set made here from setA's weights (tests/nonsquare.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import SET_A
from nonsquare import make_nonsquare_set
from dp360rt.export.profiles import parse_profile
from dp360rt.export.fixture import case_image_sizes
from dp360rt.verify import TABLE, verify


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def nonsquare_set(tmp_path_factory):
    return make_nonsquare_set(SET_A, tmp_path_factory.mktemp("setA_16x24"), latent_hw=(16, 24), steps=2)


def _all_pass(results):
    print("\n" + "\n".join(TABLE.row(r) for r in results))
    assert len(results) == 10 and all(r.ok for r in results), [r for r in results if not r.ok]


def test_fast_engine_equals_reference_on_nonsquare_latents(nonsquare_set):
    _all_pass(verify(nonsquare_set, engine="fast"))


def test_cli_verify_backend_ort_exports_the_cases_sizes_and_passes(nonsquare_set, capsys):
    """The acceptance command as a user types it, `dp360rt verify DIR --backend ort`: no export given,
    so the fixture's models are exported first, at the cases' image size (128x192, read from the
    cases), then every golden case runs through ONNX Runtime."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dp360rt.cli.main import main
    cases = torch.load(nonsquare_set / "cases.pt", weights_only=True)
    assert case_image_sizes(cases) == [(128, 192)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny networks: one thread is fastest (ORT follows torch's count)
    try:
        code = main(["verify", str(nonsquare_set), "--backend", "ort"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    print(out)
    assert code == 0 and "backend: ort" in out and "10/10 cases passed" in out, out


def test_profile_image_size_parameter():
    p = parse_profile("window8@128x192")
    assert p.name == "window8@128x192" and p.image_hw == (128, 192) and p.unet == ((8, 8),)
    assert parse_profile("w2=16:8:nvs@64x96").image_hw == (64, 96)
    with pytest.raises(ValueError, match="multiples of 8"):
        parse_profile("window8@100x192")
