"""Model hyperparameters, read from the authors' yaml terms.

A config file is JSON with one entry per model kind (``"nvs"``, ``"backview"``), each holding the
``model`` section of the authors' yaml (``{"target", "params"}``), as in the fixtures'
``config.json``. The built-in ``"full"`` config carries the values of the official checkpoints.
Only the fields that change inference are read; everything else is ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

KINDS = ("nvs", "backview")
# full: the official checkpoints; tiny: the fixtures' test size; medium: 32x32 latents, 64 channels
# (attention dominates as at full size; used by benchmarks)
BUILTIN = ("full", "tiny", "medium")


class ConfigError(ValueError):
    """A config file is missing a field or holds inconsistent values."""


@dataclass(frozen=True)
class UNetConfig:
    """Shape of one SD1.5-style UNet (main UNet, appearance net or pose ControlNet)."""

    in_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    context_dim: int
    out_channels: int = 4
    hint_channels: int = 3
    transformer_depth: int = 1

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class MotionConfig:
    """AnimateDiff-style temporal modules of the 360° UNet."""

    num_attention_heads: int
    video_length: int
    max_len: int = 24


@dataclass(frozen=True)
class VAEConfig:
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    in_channels: int = 3
    out_ch: int = 3


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    hidden_act: str


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one DiffPortrait360 model of ``kind``."""

    kind: str
    unet: UNetConfig
    appearance: UNetConfig
    pose: UNetConfig
    motion: MotionConfig | None
    vae: VAEConfig
    text: TextConfig
    timesteps: int
    linear_start: float
    linear_end: float
    scale_factor: float
    latent_size: int = 64

    @property
    def image_size(self) -> int:
        """Side of the square images the pipeline feeds this model (512 for the official files)."""
        return self.latent_size * self.downsample_factor

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD1.5)."""
        return 2 ** (len(self.vae.ch_mult) - 1)


def _get(d: Mapping[str, Any], path: str, where: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise ConfigError(f"{where}: missing field '{path}'. Fix: use a config in the authors' "
                              "yaml terms (see tests/fixtures/setA/config.json for the layout).")
        cur = cur[part]
    return cur


def _int_tuple(v: Any, name: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(i, int) and i > 0 for i in v):
        raise ConfigError(f"field '{name}' must be a non-empty list of positive integers, got {v!r}")
    return tuple(v)


def _pos_int(v: Any, name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"field '{name}' must be a positive integer, got {v!r}")
    return v


def _pos_ints(d: Mapping[str, Any], names: tuple[str, ...], where: str, prefix: str = "") -> dict[str, int]:
    """The required positive-integer fields ``names`` of ``d`` (errors name them as ``prefix + name``)."""
    return {n: _pos_int(_get(d, n, where), prefix + n) for n in names}


def _unet(p: Mapping[str, Any], where: str) -> UNetConfig:
    g = lambda k: _get(p, k, where)  # noqa: E731
    cfg = UNetConfig(
        in_channels=_pos_int(g("in_channels"), f"{where}.in_channels"),
        model_channels=_pos_int(g("model_channels"), f"{where}.model_channels"),
        channel_mult=_int_tuple(g("channel_mult"), f"{where}.channel_mult"),
        num_res_blocks=_pos_int(g("num_res_blocks"), f"{where}.num_res_blocks"),
        attention_resolutions=_int_tuple(g("attention_resolutions"), f"{where}.attention_resolutions"),
        num_heads=_pos_int(g("num_heads"), f"{where}.num_heads"),
        context_dim=_pos_int(g("context_dim"), f"{where}.context_dim"),
        out_channels=_pos_int(p.get("out_channels", 4), f"{where}.out_channels"),
        hint_channels=_pos_int(p.get("hint_channels", 3), f"{where}.hint_channels"),
        transformer_depth=_pos_int(p.get("transformer_depth", 1), f"{where}.transformer_depth"),
    )
    if cfg.transformer_depth != 1:
        raise ConfigError(f"{where}.transformer_depth = {cfg.transformer_depth}: DiffPortrait360 uses 1 "
                          "(the reference bank holds one entry per SpatialTransformer)")
    for m in cfg.channel_mult:
        c = m * cfg.model_channels
        if c % 32 or c % cfg.num_heads:
            raise ConfigError(f"{where}: channels {c} (model_channels x {m}) must be divisible by 32 "
                              f"(GroupNorm groups) and by num_heads={cfg.num_heads}")
    return cfg


def parse_model_config(kind: str, section: Mapping[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from one model section ``{"target", "params"}`` of a config file."""
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    where = f"config['{kind}']"
    params = _get(section, "params", where)
    unet_p = _get(params, "unet_config.params", where)
    unet = _unet(unet_p, f"{where}.unet_config.params")
    appearance = _unet(_get(params, "appearance_control_stage_config.params", where),
                       f"{where}.appearance_control_stage_config.params")
    pose = _unet(_get(params, "pose_control_stage_config.params", where),
                 f"{where}.pose_control_stage_config.params")
    for name, other in (("appearance_control_stage_config", appearance), ("pose_control_stage_config", pose)):
        for f in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "context_dim"):
            if getattr(other, f) != getattr(unet, f):
                raise ConfigError(f"{where}: {name}.params.{f} = {getattr(other, f)!r} differs from "
                                  f"unet_config.params.{f} = {getattr(unet, f)!r}; the reference bank and "
                                  "pose residuals need identical layouts")
    motion = None
    extra = unet_p.get("unet_additional_kwargs")
    if kind == "nvs":
        if not extra or not extra.get("use_motion_module", False):
            raise ConfigError(f"{where}: the 360° model needs unet_config.params.unet_additional_kwargs "
                              "with use_motion_module: true")
        mk = _get(extra, "motion_module_kwargs", f"{where}.unet_config.params.unet_additional_kwargs")
        motion = MotionConfig(
            num_attention_heads=_pos_int(_get(mk, "num_attention_heads", where), "num_attention_heads"),
            video_length=_pos_int(_get(mk, "video_length", where), "video_length"),
            max_len=_pos_int(mk.get("temporal_position_encoding_max_len", 24), "temporal_position_encoding_max_len"),
        )
        if motion.video_length > motion.max_len:
            raise ConfigError(f"{where}: video_length {motion.video_length} exceeds the positional table "
                              f"length {motion.max_len}")
    elif extra and extra.get("use_motion_module", False):
        raise ConfigError(f"{where}: the back-view model has no motion modules, but the config enables them")
    dd = _get(params, "first_stage_config.params.ddconfig", where)
    vae = VAEConfig(
        **_pos_ints(dd, ("ch", "num_res_blocks", "z_channels"), where, "ddconfig."),
        ch_mult=_int_tuple(_get(dd, "ch_mult", where), "ddconfig.ch_mult"),
        embed_dim=_pos_int(_get(params, "first_stage_config.params.embed_dim", where), "embed_dim"),
        in_channels=_pos_int(dd.get("in_channels", 3), "ddconfig.in_channels"),
        out_ch=_pos_int(dd.get("out_ch", 3), "ddconfig.out_ch"),
    )
    tm = _get(params, "cond_stage_config.text_model_config", where)
    text = TextConfig(
        **_pos_ints(tm, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "max_position_embeddings"), where),
        layer_norm_eps=float(tm.get("layer_norm_eps", 1e-5)),
        hidden_act=str(tm.get("hidden_act", "quick_gelu")),
    )
    if text.hidden_act not in ("quick_gelu", "gelu"):
        raise ConfigError(f"{where}: text hidden_act {text.hidden_act!r} not supported (quick_gelu, gelu)")
    if text.hidden_size != unet.context_dim:
        raise ConfigError(f"{where}: text hidden_size {text.hidden_size} != unet context_dim {unet.context_dim}")
    if unet.in_channels != vae.embed_dim:
        raise ConfigError(f"{where}: unet in_channels {unet.in_channels} != VAE embed_dim {vae.embed_dim}")
    return ModelConfig(
        kind=kind, unet=unet, appearance=appearance, pose=pose, motion=motion, vae=vae, text=text,
        timesteps=_pos_int(params.get("timesteps", 1000), "timesteps"),
        linear_start=float(params.get("linear_start", 0.00085)),
        linear_end=float(params.get("linear_end", 0.012)),
        scale_factor=float(params.get("scale_factor", 0.18215)),
        latent_size=_pos_int(params.get("image_size", 64), "image_size"),
    )


def load_config(config: str | Path | Mapping[str, Any] = "full") -> dict[str, ModelConfig]:
    """Read a config: ``"full"``, ``"tiny"`` or ``"medium"`` (built in), a path to a ``config.json`` (or its folder), or a dict.

    Returns ``{"nvs": ModelConfig, "backview": ModelConfig}`` for the kinds the file holds.
    """
    if isinstance(config, Mapping):
        raw, where = config, "<dict>"
    else:
        if str(config) in BUILTIN:
            text = resources.files("dp360rt").joinpath(f"configs/{config}.json").read_text()
            where = f"built-in '{config}'"
        else:
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}. Fix: pass 'full', 'tiny', 'medium' or a config.json path")
            text, where = path.read_text(), str(path)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e}). Fix: pass a config.json in the fixtures' format") from e
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: top level must be an object with 'nvs' and/or 'backview'")
    out = {k: parse_model_config(k, raw[k]) for k in KINDS if k in raw}
    if not out:
        raise ConfigError(f"{where}: holds neither 'nvs' nor 'backview' model sections")
    return out


def get_model_config(kind: str, config: str | Path | Mapping[str, Any] | ModelConfig = "full") -> ModelConfig:
    """The :class:`ModelConfig` of ``kind`` from any accepted config form."""
    if isinstance(config, ModelConfig):
        if config.kind != kind:
            raise ConfigError(f"config is for {config.kind!r}, not {kind!r}")
        return config
    cfgs = load_config(config)
    if kind not in cfgs:
        raise ConfigError(f"config has no section for model kind {kind!r} (has {sorted(cfgs)})")
    return cfgs[kind]
