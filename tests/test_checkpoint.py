"""Loading through the public loader, and one test per loading error."""
from __future__ import annotations

import hashlib
import json
import pickle
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import SET_A
from dp360rt import CheckpointError, ConfigError, build_model, load_checkpoint, load_config
from dp360rt.checkpoint import convert, read_state_dict


def test_recipe_is_bit_exact(recipe):
    init = json.loads((SET_A / "init.json").read_text())
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert recipe["nvs"][key].flatten()[:4].tolist() == pytest.approx(
        [0.037617855, 0.19883893, 0.10565249, -0.026204992], rel=1e-7)
    expected = {"nvs": "e79b893ab4cfad75cfd28515885b6bae3ee6bda4dfd320aeaa085b73d2b88d51",
                "backview": "bf5b917e146864dcc7a7aed81067ee405c2631229ea081c7a7f63eba482d1408"}
    for kind, digest in expected.items():
        h = hashlib.sha256()
        for k in init["models"][kind]:
            h.update(recipe[kind][k].numpy().astype("<f4").tobytes())
        assert h.hexdigest() == digest, kind


@pytest.fixture(scope="module")
def saved(recipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for kind in ("nvs", "backview"):
        torch.save(recipe[kind], d / f"{kind}.th")
        save_file({k: v.contiguous() for k, v in recipe[kind].items()}, str(d / f"{kind}.safetensors"))
        paths[kind] = d
    return d


@pytest.mark.parametrize("suffix", [".th", ".safetensors"])
@pytest.mark.parametrize("kind", ["nvs", "backview"])
def test_load_saved_files(saved, recipe, kind, suffix):
    m = build_model(kind, SET_A)
    load_checkpoint(m, saved / f"{kind}{suffix}")
    sd = m.state_dict()
    for k, v in recipe[kind].items():
        assert torch.equal(sd[k], v), k


def test_position_ids_accepted_and_ignored(recipe, tmp_path):
    sd = dict(recipe["nvs"])
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(sd, tmp_path / "with_pos.th")
    m = load_checkpoint(build_model("nvs", SET_A), tmp_path / "with_pos.th")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(m.state_dict()[key], recipe["nvs"][key])


def test_wrapped_state_dict_accepted(recipe, tmp_path):
    torch.save({"state_dict": recipe["backview"]}, tmp_path / "wrapped.ckpt")
    m = load_checkpoint(build_model("backview", SET_A), tmp_path / "wrapped.ckpt")
    key = "control_model.input_blocks.0.0.weight"
    assert torch.equal(m.state_dict()[key], recipe["backview"][key])


def test_convert_fp16_roundtrip(saved, recipe, tmp_path):
    out = tmp_path / "nvs16.safetensors"
    info = convert(saved / "nvs.th", out, fp16=True)
    assert info["kind"] == "nvs"
    sd = read_state_dict(out)
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert sd["alphas_cumprod"].dtype == torch.float16 and sd["logvar"].dtype == torch.float32
    m = load_checkpoint(build_model("nvs", SET_A), out)
    w = m.state_dict()["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(w, recipe["nvs"]["model.diffusion_model.input_blocks.0.0.weight"].half().float())


# --- errors: each names the problem ------------------------------------------------------------
def _expect(match, fn, *a):
    with pytest.raises(CheckpointError, match=match):
        fn(*a)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "photo.th"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    _expect("not a PyTorch checkpoint", load_checkpoint, build_model("nvs", SET_A, device="meta"), p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.th"
    p.write_bytes(b"")
    _expect("empty", load_checkpoint, build_model("nvs", SET_A, device="meta"), p)


def test_missing_file(tmp_path):
    _expect("not found", read_state_dict, tmp_path / "nope.th")


@pytest.mark.parametrize("suffix", [".th", ".safetensors"])
def test_truncated_file(saved, tmp_path, suffix):
    data = (saved / f"nvs{suffix}").read_bytes()
    p = tmp_path / f"trunc{suffix}"
    p.write_bytes(data[: len(data) // 2])
    _expect("truncated|corrupted", read_state_dict, p)


def test_backview_given_for_nvs(saved):
    _expect("back-view generator.*swap", load_checkpoint, build_model("nvs", SET_A), saved / "backview.th")


def test_nvs_given_for_backview(saved):
    _expect("360° view generator.*swap", load_checkpoint, build_model("backview", SET_A), saved / "nvs.th")


def test_not_diffportrait(tmp_path):
    _expect("not a DiffPortrait360 checkpoint", load_checkpoint, build_model("nvs", SET_A),
            {"encoder.weight": torch.zeros(2)})


def test_missing_keys(recipe):
    sd = dict(recipe["nvs"])
    del sd["control_model.time_embed.0.weight"], sd["first_stage_model.decoder.conv_out.bias"]
    _expect("2 missing key.*control_model.time_embed.0.weight", load_checkpoint, build_model("nvs", SET_A), sd)


def test_unexpected_keys(recipe):
    sd = dict(recipe["backview"])
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    _expect("1 unexpected key.*extra.weight", load_checkpoint, build_model("backview", SET_A), sd)


def test_wrong_shapes_full_config(saved):
    _expect("wrong shape.*config='full'", load_checkpoint, build_model("backview", "full", device="meta"),
            saved / "backview.th")


def test_nan_in_weights(recipe):
    sd = dict(recipe["backview"])
    w = sd["control_model.time_embed.0.weight"].clone()
    w[0, 0] = float("nan")
    sd["control_model.time_embed.0.weight"] = w
    _expect("NaN or Inf.*control_model.time_embed.0.weight", load_checkpoint, build_model("backview", SET_A), sd)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_refused(tmp_path, capsys):
    p = tmp_path / "evil.th"
    torch.save({"model.diffusion_model.x": _Evil()}, p)
    _expect("refused by torch.load\\(weights_only=True\\).*never unpickles", read_state_dict, p)
    assert "pwned" not in capsys.readouterr().out


def test_legacy_pickle_with_code_refused(tmp_path):
    p = tmp_path / "legacy.th"
    with open(p, "wb") as f:
        pickle.dump({"a": _Evil()}, f)
    _expect("refused|not a PyTorch", read_state_dict, p)


def test_config_missing_field():
    cfg = json.loads((SET_A / "config.json").read_text())
    del cfg["nvs"]["params"]["unet_config"]["params"]["model_channels"]
    with pytest.raises(ConfigError, match="missing field 'model_channels'"):
        load_config(cfg)


def test_config_inconsistent():
    cfg = json.loads((SET_A / "config.json").read_text())
    cfg["backview"]["params"]["pose_control_stage_config"]["params"]["model_channels"] = 64
    with pytest.raises(ConfigError, match="differs from unet_config"):
        load_config(cfg)


def test_config_not_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p)


def test_config_bad_value():
    cfg = json.loads((SET_A / "config.json").read_text())
    cfg["nvs"]["params"]["unet_config"]["params"]["channel_mult"] = "1,2"
    with pytest.raises(ConfigError, match="channel_mult"):
        load_config(cfg)


def test_identical_tensors_are_kept_once(recipe):
    """The frozen VAE and text tower that both checkpoints carry are held once; results unchanged."""
    from dp360rt import Pipeline
    from dp360rt.io.images import synthetic_conditions, synthetic_portrait
    bv = dict(recipe["backview"])
    frozen = [k for k in recipe["nvs"] if k.startswith(("first_stage_model.", "cond_stage_model."))
              and k in bv and bv[k].shape == recipe["nvs"][k].shape]
    for k in frozen:
        bv[k] = recipe["nvs"][k].clone()
    cfg = SET_A / "config.json"
    shared = Pipeline.from_checkpoints(recipe["nvs"], bv, config=cfg)
    separate = Pipeline.from_checkpoints(recipe["nvs"], recipe["backview"], config=cfg)
    assert shared.shared["tensors"] >= len(frozen) > 100
    assert shared.shared["bytes"] >= sum(recipe["nvs"][k].numel() * 4 for k in frozen)
    vae_w = "encoder.conv_in.weight"
    assert shared.backview.first_stage_model.get_parameter(vae_w) is shared.nvs.first_stage_model.get_parameter(vae_w)
    assert separate.backview.first_stage_model.get_parameter(vae_w) is not separate.nvs.first_stage_model.get_parameter(vae_w)
    # the numbers: the shared pipeline equals a pipeline loaded from the modified backview weights without sharing
    plain = Pipeline(shared.nvs, Pipeline.from_checkpoints(recipe["nvs"], bv, config=cfg).backview)
    por, cond = synthetic_portrait(64), synthetic_conditions(32, 64)
    a, b = shared(por, cond, steps=2, seed=3), plain(por, cond, steps=2, seed=3)
    assert torch.equal(a.back_view, b.back_view) and torch.equal(a.views, b.views)
    assert sum(p.numel() for p in {id(p): p for m in (shared.nvs, shared.backview) for p in m.parameters()}.values()) \
        < sum(p.numel() for m in (separate.nvs, separate.backview) for p in m.parameters())


def test_recipe_files_checked(tmp_path):
    """A seeded-recipe fixture set with a file missing, a malformed file or the wrong format is
    refused naming the problem (both the DiffPortrait360 and the PanoHead recipes read through
    checkpoint.read_recipe)."""
    import json
    import shutil
    from dp360rt.checkpoint import CheckpointError, materialize_recipe
    from dp360rt.panohead import PanoHeadCheckpointError
    from dp360rt.panohead.weights import recipe_state_dicts
    src = SET_A
    d = tmp_path / "set"
    d.mkdir()
    shutil.copy(src / "init.json", d / "init.json")
    with pytest.raises(CheckpointError, match=r"buffers\.pt missing"):
        materialize_recipe(d, "nvs")
    shutil.copy(src / "buffers.pt", d / "buffers.pt")
    (d / "init.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed"):
        materialize_recipe(d, "nvs")
    (d / "init.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a dp360-init-v1 recipe"):
        materialize_recipe(d, "nvs")
    with pytest.raises(PanoHeadCheckpointError, match="not a panohead-init-v1 recipe"):
        recipe_state_dicts(d)
