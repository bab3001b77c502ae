"""The end-to-end pipeline: portrait in, back view and 32 views out (the authors' driver, §7 of
SEMANTICS.md), over an exchangeable sampling engine."""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..backends.base import Backend
from ..backends.torch_backend import TorchBackend
from ..checkpoint import checked_state_dict, identical_tensors, load_checkpoint, load_state
from ..config import ModelConfig, load_config
from .generation import GenerationResult, Prepared
from ..io.images import (BACK_CONDITION_INDEX, CONDITION_COUNT, ImageError, check_conditions, load_conditions, load_frames,
                     load_portrait, quantize8, to_unit)
from ..model import (HALF_DTYPES, DiffPortrait360, autocast, build_model, cast_weights_at_call, cpu_half_is_native,
                    dtype_bytes, init_random, store_half_weights)
from .offload import ModelSwap, move_resident
from ..sampler.noise import NoiseSource, RecordedNoise, as_noise
from ..sampler.fast import sample_windows_fast
from ..sampler.params import check_finite_latents, check_sampler_params
from ..sampler.plan import BatchPlan, default_plan
from ..sampler.windows import CONDITION_WINDOWS, Window, prepare_windows, sample_windows_reference
from ..text.clip import empty_prompt_ids

log = logging.getLogger("dp360rt")

ENGINES = ("fast", "reference")
BACKENDS = ("torch", "ort", "trt")


def memory_plan(nvs: DiffPortrait360, backview: DiffPortrait360, device: torch.device, dtype: torch.dtype,
                max_memory: int | None, compute_dtype: torch.dtype | None = None) -> BatchPlan:
    """The fast engine's batch plan for these two models under ``max_memory`` bytes (None: no
    limit), counting the tensors they hold as one copy once (see :func:`default_plan`); weights
    in ``dtype``, activations in ``compute_dtype`` (default ``dtype``)."""
    dbytes = dtype_bytes(dtype)
    nvs_ids = {id(p) for p in nvs.parameters()}
    shared = sum(p.numel() for p in backview.parameters() if id(p) in nvs_ids) * dbytes
    return default_plan(nvs.cfg, device.type, dbytes, max_memory, CONDITION_WINDOWS,
                        backview=backview.cfg, shared_bytes=shared,
                        compute_bytes=dtype_bytes(compute_dtype or dtype))


def check_options(device: str | torch.device, backend: str, max_memory: Any, dtype: torch.dtype = torch.float32,
                  compute_dtype: torch.dtype | None = None) -> tuple[torch.device, int | None]:
    """Refuse a device, backend, dtype pair or memory budget this process cannot honour, before any
    weights load -> (device, max_memory in bytes or None for no limit: None and 0 both mean no
    limit). Warns when half precision would run on a CPU without native half-precision arithmetic."""
    from ..io.checks import device as check_device
    from ..io.checks import max_memory_bytes
    dev = check_device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}. Fix: use one of {', '.join(BACKENDS)}")
    if dtype not in (torch.float32, *HALF_DTYPES):
        raise ValueError(f"dtype={dtype} is not supported. Fix: use torch.float32, torch.float16 or torch.bfloat16")
    compute = compute_dtype or dtype
    if compute not in (dtype, torch.float32):
        raise ValueError(f"compute_dtype={compute} with dtype={dtype}: the arithmetic runs in the weights' dtype "
                         "or in float32. Fix: compute_dtype=None (the weights' dtype) or torch.float32")
    if compute != dtype and backend != "torch":
        raise ValueError(f"compute_dtype={compute} with dtype={dtype} casts the PyTorch modules' weights at each call; "
                         f"backend={backend!r} runs exported networks in their own dtype. Fix: backend='torch', "
                         "or leave compute_dtype unset")
    if compute in HALF_DTYPES and dev.type == "cpu" and backend == "torch" and not cpu_half_is_native(compute):
        warnings.warn(
            f"dtype={compute} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native {compute} "
            "arithmetic): torch runs its reference convolution loop, hundreds of times slower than float32. "
            f"Fix: compute_dtype=torch.float32 keeps the {compute} weights (half the memory) and computes in "
            "float32, or use torch.float32; half-precision arithmetic pays off on GPUs and on CPUs with "
            "AVX512-BF16/AMX", RuntimeWarning, stacklevel=1)  # one place: Python's default filter shows it once
    if backend == "trt":
        from ..backends.trt_backend import import_trt
        import_trt()                  # TrtUnavailableError (an ImportError) with the fix
    return dev, max_memory_bytes(max_memory)




class Pipeline:
    """DiffPortrait360 end to end. Build with :meth:`from_checkpoints` or :meth:`random`.

    ``pipe(portrait, conditions)`` -> :class:`GenerationResult` with the back view and all views.
    ``engine="fast"`` (default) computes the reference's numbers with the shared-bank schedule;
    ``engine="reference"`` runs the authors' loop as it is (the ground truth). ``max_memory``
    (bytes; None or 0: no limit) bounds the fast engine's batch (see ``pipe.plan``); when both diffusion models and the
    smallest batch do not fit, edge mode keeps one model resident at a time (the idle one written
    once to ``offload_dir``, default a temporary folder, and reloaded when needed: ``pipe.swap``)
    and decodes views in slices. ``backend="ort"|"trt"`` runs the
    networks from an ONNX export (``export_dir``: one directory, or ``{"nvs": DIR, "backview": DIR}``;
    make one with ``dp360rt export``) under the fast engine's schedule; ``"torch"`` (default) runs
    the PyTorch modules.
    ``swap``: a :class:`ModelSwap` already holding these two models (what
    :meth:`from_checkpoints` makes while loading in edge mode). ``dtype`` is the weights' dtype and,
    by default, the arithmetic's (autocast); ``compute_dtype=torch.float32`` with a half ``dtype``
    keeps half-precision weights and computes in float32 (for CPUs without native half precision).
    """

    def __init__(self, nvs: DiffPortrait360, backview: DiffPortrait360, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, engine: str = "fast", max_memory: int | None = None,
                 backend: str = "torch", export_dir: str | Path | Mapping[str, str | Path] | None = None,
                 crop: str | None = None, offload_dir: str | Path | None = None, inverter: Any = None,
                 swap: ModelSwap | None = None, compute_dtype: torch.dtype | None = None, **backend_options: Any):
        if nvs.kind != "nvs" or backview.kind != "backview":
            raise ValueError("Pipeline(nvs=..., backview=...): models of the wrong kind; swap them")
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {sorted(ENGINES)}")
        self.crop = _crop_mode(crop)
        self.inverter = inverter        # a dp360rt.invert.Inverter: 3D-aware noise from a PanoHead inversion
        self.device, max_memory = check_options(device, backend, max_memory, dtype, compute_dtype)
        self.dtype = dtype
        self.compute_dtype = compute_dtype or dtype
        self.engine = engine
        if dtype in HALF_DTYPES and backend == "torch":
            # Weights in the half dtype: the same numbers as autocast over float32 weights (autocast
            # casts exactly these), half the memory, and what the memory plan counts (2 bytes each).
            for m in (nvs, backview):
                store_half_weights(m, dtype)
                if self.compute_dtype == torch.float32:
                    cast_weights_at_call(m)
        self.nvs, self.backview = nvs, backview
        self.image_size = nvs.cfg.image_size
        self.max_memory = max_memory
        self.plan: BatchPlan | None = None
        self.shared = {"tensors": 0, "bytes": 0}        # tensors the two models hold as one copy
        self.swap: ModelSwap | None = None
        if engine == "fast":
            self.plan = memory_plan(nvs, backview, self.device, dtype, max_memory, self.compute_dtype)
            log.info("memory plan: %s", self.plan.describe(CONDITION_WINDOWS, nvs.frames))
        if self.plan is not None and self.plan.one_model_resident:
            if backend != "torch":
                raise ValueError(
                    f"max_memory={max_memory / 2**30:.2f} GiB needs one diffusion model resident at a time (edge mode), "
                    f"which only backend='torch' does; backend={backend!r} keeps its own copy of each network. "
                    "Fix: use backend='torch' or raise max_memory")
            # The back view runs first, so the 360° model starts offloaded.
            if swap is None:
                swap = ModelSwap({"backview": backview, "nvs": nvs}, self.device, offload_dir)
            else:       # from_checkpoints loaded the back-view model's own weights after making the swap
                move_resident(backview, self.device)
            self.swap = swap
        else:
            self.nvs.to(self.device)
            self.backview.to(self.device)
        self.backend = backend
        if backend != "torch" and engine != "fast":
            raise ValueError(f"backend={backend!r} runs exported networks under the fast engine's schedule. "
                             "Fix: use engine='fast' (the same numbers as the reference)")
        self.backends: dict[str, Backend] = {}       # kind -> what runs that model's networks
        for m in (self.nvs, self.backview):
            if backend == "torch":
                self.backends[m.kind] = TorchBackend(m)
            else:
                from ..backends.base import get_backend
                d = export_dir.get(m.kind) if isinstance(export_dir, Mapping) else export_dir
                self.backends[m.kind] = get_backend(backend, m, export_dir=d, **backend_options)

    def net(self, model: DiffPortrait360) -> Backend:
        """The backend that runs ``model``'s networks (its text tower, VAE, appearance net, pose
        net and UNet): the exported one chosen by ``backend=``, else the PyTorch modules wrapped in
        :class:`~dp360rt.backends.torch_backend.TorchBackend`."""
        return self.backends[model.kind]

    def use(self, model: DiffPortrait360) -> DiffPortrait360:
        """Make ``model`` resident (edge mode reloads it and offloads the other; otherwise a no-op)."""
        if self.swap is not None:
            self.swap.use(model.kind)
        return model

    def decode(self, model: DiffPortrait360, latent: Tensor) -> Tensor:
        """Latents [B, 4, h, w] -> images [B, 3, 8h, 8w] (about [-1, 1]) in slices of the plan's
        ``decode_frames`` (a tight budget), else in one call."""
        n = self.plan.decode_frames if self.plan is not None and self.plan.decode_frames else latent.shape[0]
        return torch.cat([self.net(model).decode_latent(latent[i:i + n]) for i in range(0, latent.shape[0], n)])

    def _engine(self, model: DiffPortrait360, windows: list[Window], **kw: Any) -> tuple[list[Tensor], int]:
        if self.engine == "fast":
            plan = self.plan if model.kind == "nvs" else None
            return sample_windows_fast(model, windows, plan=plan, backend=self.net(model), **kw)
        return sample_windows_reference(model, windows, **kw)
    @classmethod
    def from_checkpoints(cls, nvs: str | Path | Mapping[str, Tensor], backview: str | Path | Mapping[str, Tensor], *,
                         config: str | Path | Mapping[str, Any] = "full", device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, engine: str = "fast",
                         max_memory: int | None = None, backend: str = "torch",
                         export_dir: str | Path | Mapping[str, str | Path] | None = None,
                         crop: str | None = None, inverter: Any = None, compute_dtype: torch.dtype | None = None,
                         **backend_options: Any) -> "Pipeline":
        """Load the two official checkpoint files (or state dicts) strictly; tensors both hold
        identically (the frozen VAE and text tower) are kept once (``pipe.shared`` says how many).
        In edge mode (a ``max_memory`` that needs one diffusion model resident at a time) the
        360° model is offloaded before the back-view model's own weights load."""
        dev, budget = check_options(device, backend, max_memory, dtype, compute_dtype)  # before minutes of loading
        cfgs = load_config(config)
        half = dtype if dtype in HALF_DTYPES and backend == "torch" else None

        def empty(kind: str) -> DiffPortrait360:
            # Built on 'meta' and given the checkpoint's tensors: no float32 copy of the weights beside
            # the loaded ones, and half-precision weights are cast tensor by tensor as they load.
            m = build_model(kind, cfgs[kind], device="meta")
            if half is not None:
                store_half_weights(m, half)
            return m

        nvs_model = load_checkpoint(empty("nvs"), nvs)
        bv_model = empty("backview")
        bv_state = checked_state_dict(bv_model, backview)
        # The tensors both files hold identically (the frozen VAE and text tower) are kept once: the
        # back-view model takes the 360° model's copy.
        shared = identical_tensors(nvs_model, bv_model, bv_state)
        bv_model.load_state_dict(shared, strict=False, assign=True)
        swap = None
        if engine == "fast" and backend == "torch" and budget is not None:
            plan = memory_plan(nvs_model, bv_model, dev, dtype, budget, compute_dtype)
            if plan.one_model_resident:
                # Edge mode: the 360° model goes to its offload file before the back-view model's own
                # weights load, so the two are never resident together, not even while loading.
                swap = ModelSwap({"backview": bv_model, "nvs": nvs_model}, dev, backend_options.pop("offload_dir", None))
        load_state(bv_model, {**bv_state, **shared}, copy=not isinstance(backview, Mapping))
        del bv_state
        try:
            pipe = cls(nvs_model, bv_model, device=dev, dtype=dtype, engine=engine, max_memory=budget, backend=backend,
                       export_dir=export_dir, crop=crop, inverter=inverter, swap=swap, compute_dtype=compute_dtype,
                       **backend_options)
        except BaseException:
            if swap is not None:
                swap.close()
            raise
        pipe.shared = {"tensors": len(shared), "bytes": sum(t.numel() * t.element_size() for t in shared.values())}
        return pipe

    @classmethod
    def random(cls, config: str | Path | Mapping[str, Any] | dict[str, ModelConfig], seed: int = 0,
               **kw: Any) -> "Pipeline":
        """Random-weight models (for demos, tests and benchmarks): real speed, meaningless pictures."""
        check_options(kw.get("device", "cpu"), kw.get("backend", "torch"), kw.get("max_memory"), kw.get("dtype", torch.float32),
                      kw.get("compute_dtype"))
        cfgs = config if isinstance(config, dict) and all(isinstance(v, ModelConfig) for v in config.values()) \
            else load_config(config)
        torch.manual_seed(seed)
        models = {k: build_model(k, cfgs[k], device=kw.get("device", "cpu")) for k in ("nvs", "backview")}
        for m in models.values():
            init_random(m)
        return cls(models["nvs"], models["backview"], **kw)

    def runtime(self, policy: str = "throughput", **kw: Any):
        """The native streaming runtime over this pipeline (created once per policy)."""
        from .runtime import Runtime
        cache = self.__dict__.setdefault("_runtimes", {})
        if policy not in cache:
            cache[policy] = Runtime(self, policy=policy, max_memory=self.max_memory, **kw)
        return cache[policy]

    def prepare(self, portrait: Any, *, crop: str | None = "default", noise3d: bool = True, features: Any = None,
                progress: Callable[[str, int, int], None] | None = None) -> Prepared:
        """The stages before the diffusion models: ``crop="auto"`` crops the raw photo to PanoHead's
        framing, and with an ``inverter`` and no ``features`` the (cropped) portrait is inverted into
        PanoHead for 3D-aware noise. Returns a :class:`Prepared` (the portrait to generate from, the
        features [32, 3, S, S] or None, and the crop and inversion results to save); ``progress``
        gets ``(stage, i, n)`` as the inversion goes."""
        portrait, cropped = self._crop_portrait(portrait, self.crop if crop == "default" else crop)
        if cropped is not None and progress:
            progress("crop", 1, 1)
        features, inversion = self._noise3d(portrait, cropped, features, noise3d, progress)
        return Prepared(portrait, features, cropped, inversion)

    def stream(self, portrait: Any, conditions: str | Path | Tensor, *, policy: str = "latency", **kw: Any):
        """Yield :class:`~dp360rt.engine.runtime.View` objects as views finish (C++ step loop).

        ``policy="latency"`` (default here) finishes and streams window 0 first; keyword arguments
        as for :meth:`submit`. Stopping the iteration early cancels the request.
        """
        return self.runtime(policy).stream(*self._prepared(portrait, kw), conditions, **kw)

    def submit(self, portrait: Any, conditions: str | Path | Tensor, *, policy: str = "throughput", **kw: Any):
        """Queue a generation on the C++ step loop; returns a handle with ``cancel()``, ``result()``,
        ``progress`` and view iteration. Keywords: steps, seed, features, cameras (as for ``__call__``),
        crop and noise3d (see :meth:`prepare`; pass a :class:`Prepared` portrait to skip them)."""
        return self.runtime(policy).submit(*self._prepared(portrait, kw), conditions, **kw)

    def _prepared(self, portrait: Any, kw: dict[str, Any]) -> tuple[Any]:
        crop, noise3d, progress = kw.pop("crop", self.crop), kw.pop("noise3d", True), kw.pop("progress", None)
        if not isinstance(portrait, Prepared):
            portrait = self.prepare(portrait, crop=crop, noise3d=noise3d, features=kw.get("features"), progress=progress)
        kw["features"] = portrait.features
        return (portrait.portrait,)

    def close(self) -> None:
        """Stop the runtimes' loop threads (also done at interpreter exit) and remove edge mode's
        temporary offload files."""
        for rt in self.__dict__.pop("_runtimes", {}).values():
            rt.shutdown()
        if self.swap is not None:
            self.swap.close()

    def flops(self, steps: int = 50) -> dict[str, dict[str, float]]:
        """FLOPs of this pipeline's engine per step and per run, per module (counted on meta tensors;
        see :func:`dp360rt.flops.run_flops`)."""
        from ..flops import run_flops
        return run_flops(self.nvs.cfg, self.engine, steps)

    def _crop_portrait(self, portrait: Any, crop: str | None) -> tuple[Any, Any]:
        """(portrait, None), or with ``crop="auto"`` (the 512² PanoHead crop of the photo, its
        :class:`dp360rt.crop.CropResult`)."""
        if _crop_mode(crop) is None:
            return portrait, None
        if isinstance(portrait, Tensor):
            raise ImageError("crop='auto' needs the raw photo (a path or PIL image), not a tensor. Fix: pass the "
                             "photo, or crop=None for an already cropped portrait tensor")
        from ..crop import crop_portrait
        result = crop_portrait(portrait)
        return result.image, result

    def _noise3d(self, portrait: Any, cropped: Any, features: Any, noise3d: bool,
                 progress: Callable[[str, int, int], None] | None) -> tuple[Any, Any]:
        """(features, inversion): with an inverter, no ``features`` given and ``noise3d``, the
        32 feature frames of the portrait's PanoHead inversion (as the pipeline's features
        [32, 3, S, S]); else ``features`` unchanged and None."""
        if features is not None or not noise3d or self.inverter is None:
            return features, None
        if isinstance(portrait, Tensor):
            raise ImageError("3D-aware noise inverts the portrait image, not a tensor. Fix: pass the photo (a path or "
                             "PIL image), or noise3d=False")
        camera = cropped.camera if cropped is not None else None
        if camera is None:
            import warnings
            warnings.warn("3D-aware noise without crop='auto': the portrait's camera is unknown, the frontal camera "
                          "is used. Fix: crop='auto' (or --crop auto) estimates it")
        image = cropped.image if cropped is not None else portrait
        inversion = self.inverter(image, camera, progress=progress)
        return inversion.features(self.image_size), inversion

    def text_context(self, model: DiffPortrait360) -> Tensor:
        """The empty prompt's text context [1, 77, C] from ``model``'s text tower."""
        return self.net(model).encode_text(empty_prompt_ids(model.cfg.text.max_position_embeddings).to(self.device))

    @torch.no_grad()
    def __call__(self, portrait: Any, conditions: str | Path | Tensor, *, features: Tensor | None = None,
                 cameras: Tensor | str | Path | None = None, steps: int = 50, eta: float = 0.5, cfg_scale: float = 3.0,
                 seed: int | torch.Generator | NoiseSource | None = 0,
                 progress: Callable[[str, int, int], None] | None = None, crop: str | None = "default",
                 noise3d: bool = True) -> GenerationResult:
        """Generate the back view, then all views.

        portrait: path / PIL image / [1, 3, S, S] tensor; conditions: the authors' condition folder
        or a tensor [N, 3, S, S] in [-1, 1] (N a multiple of 8; index 18 is the back-view hint);
        features: optional [N, 3, S, S] frames (or a folder of them) for the 3D-aware start; cameras: the views' [N, 25]
        PanoHead cameras or a cameras.json (default: the condition folder's cameras.json, else the
        default orbit, see :func:`dp360rt.nerf.cameras.resolve_cameras`). Randomness from ``seed``
        (an int, a CPU ``torch.Generator``, or a noise source). ``crop="auto"`` first crops the
        raw photo to PanoHead's framing (:func:`dp360rt.crop.crop_portrait`; ``result.crop``);
        default: the pipeline's ``crop`` setting. With an ``inverter`` (:class:`dp360rt.invert.Inverter`)
        and no ``features``, the portrait is first inverted into PanoHead and its 32 renders are the
        features (3D-aware noise; ``result.inversion``); ``noise3d=False`` skips that stage.
        """
        check_sampler_params(steps=steps, eta=eta, cfg_scale=cfg_scale, seed=seed, conditions=conditions)
        s = self.image_size
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        portrait, cropped = self._crop_portrait(portrait, self.crop if crop == "default" else crop)
        if cropped is not None:
            timings["crop"] = time.perf_counter() - tic
            if progress:
                progress("crop", 1, 1)
            tic = time.perf_counter()
        features, inversion = self._noise3d(portrait, cropped, features, noise3d, progress)
        if inversion is not None:
            timings.update({f"inversion_{k}": v for k, v in inversion.timings.items()})
            tic = time.perf_counter()
        img = load_portrait(portrait, s).to(self.device)
        cond = conditions if isinstance(conditions, Tensor) else load_conditions(conditions, s)
        if isinstance(features, (str, Path)):
            features = load_frames(features, s, cond.shape[0] if cond.dim() == 4 else CONDITION_COUNT)
        check_conditions(cond, s, self.nvs.frames, features)      # before any model runs
        from ..nerf.cameras import resolve_cameras
        view_cameras = resolve_cameras(cameras, cond.shape[0], conditions)
        cond = cond.to(self.device)
        if features is not None:
            features = features.to(self.device)
        noise = as_noise(seed)
        timings["preprocess"] = time.perf_counter() - tic
        report = (lambda stage: (lambda i, n: progress(stage, i, n))) if progress else (lambda stage: None)
        reloaded = self.swap.reload_seconds if self.swap is not None else 0.0
        with autocast(self.device, self.compute_dtype):
            tic = time.perf_counter()
            bv = self.use(self.backview)
            ctx_b = self.text_context(bv)
            mean, logvar = self.net(bv).encode_image(img)
            ref = bv.sample_latent(mean, logvar, noise(mean.shape, self.device))
            hint_b = cond[BACK_CONDITION_INDEX:BACK_CONDITION_INDEX + 1]
            shape_b = (1, bv.cfg.unet.in_channels, s // 8, s // 8)
            bv_window = Window(0, hint_b, None, RecordedNoise([noise(shape_b, self.device) for _ in range(steps + 1)]))
            (z_b,), calls = self._engine(bv, [bv_window], context=ctx_b, ref_front=ref, ref_back=[], steps=steps,
                                         eta=eta, cfg_scale=cfg_scale, progress=report("back view"))
            check_finite_latents(z_b, "the back view")
            back = quantize8(self.net(bv).decode_latent(z_b).float())
            timings["back_view"] = time.perf_counter() - tic

            tic = time.perf_counter()
            m = self.use(self.nvs)
            ctx = self.text_context(m)
            mean, logvar = self.net(m).encode_image(img)
            ref_front = m.sample_latent(mean, logvar, noise(mean.shape, self.device))
            mean, logvar = self.net(m).encode_image(back.to(self.device))
            ref_back = m.sample_latent(mean, logvar, noise(mean.shape, self.device))
            windows = prepare_windows(m, cond, features, steps, noise)
            timings["encode"] = time.perf_counter() - tic
            tic = time.perf_counter()
            latents, n_calls = self._engine(
                m, windows, context=ctx, ref_front=ref_front, ref_back=[ref_back], steps=steps, eta=eta,
                cfg_scale=cfg_scale, progress=report("views"))
            timings["views"] = time.perf_counter() - tic
            for k, z in enumerate(latents):
                check_finite_latents(z, f"window {k} (views {k * m.frames}-{(k + 1) * m.frames - 1})")
            tic = time.perf_counter()
            views = torch.cat([to_unit(self.decode(m, z).float()).cpu() for z in latents])
            timings["decode"] = time.perf_counter() - tic
        if self.swap is not None:
            timings["reload"] = self.swap.reload_seconds - reloaded       # part of back_view/encode above
        return GenerationResult(back_view=to_unit(back[0]).cpu(), views=views, latents=torch.cat(latents).cpu(),
                                cameras=view_cameras, timings=timings,
                                unet_calls=calls + n_calls, crop=cropped, inversion=inversion)


def _crop_mode(crop: str | None) -> str | None:
    if crop in (None, "none"):
        return None
    if crop != "auto":
        raise ValueError(f"crop={crop!r} is not a crop mode. Fix: use crop='auto' (PanoHead's face crop of a raw "
                         "photo) or crop=None (the portrait is already cropped)")
    return "auto"
