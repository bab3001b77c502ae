"""Radiance fields: density ``sigma(x)`` (per world unit) and colour ``rgb(x, d)`` in [0, 1].

* :class:`GridField` (``encoding="grid"``, the default on CPU): a dense voxel grid holding a raw
  density and spherical-harmonic colour coefficients per vertex, trilinearly interpolated;
  ``sigma = softplus(raw + shift) * density_scale`` (activation after interpolation, so surfaces
  can be sharper than a voxel), ``rgb = sigmoid(sum_k c_k Y_k(d))``. Trained coarse to fine
  (:meth:`GridField.upsample`). Fast on CPU: one 2D ``grid_sample`` per batch of samples.
* :class:`HashField` (``encoding="hash"``, the default on CUDA): instant-ngp's model, a
  multiresolution hash encoding, a density MLP (1 hidden layer of 64, 16 outputs: the first is
  the log density, the other 15 feed the colour MLP) and a colour MLP (2 hidden layers of 64)
  on those features plus the view direction's spherical harmonics (degree 3, 16 numbers).
  Encoding backends: tiny-cuda-nn when importable on CUDA (encoding and both MLPs; *untested
  here*), else our Triton kernel on CUDA, else PyTorch. MLPs run in fp16 autocast on CUDA.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoding import HashGrid, SparseVoxelGrid, sh_basis, tcnn_available


def _softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


def vertices_of_cells(cells: Tensor) -> Tensor:
    """Vertices [R, R, R] touching any True cell of ``cells`` [R-1, R-1, R-1]."""
    from .occupancy import any_cell
    return any_cell(cells.bool())


class GridField(nn.Module):
    kind = "grid"

    def __init__(self, res: int = 128, sh_degree: int = 0, density_scale: float = 100.0,
                 density_init: float = 0.5, empty_density: float = 1e-3, active: Tensor | None = None):
        """``density_init``: initial density (per world unit) at active vertices; ``empty_density``:
        density of inactive vertices (pruned space)."""
        super().__init__()
        self.sh_degree = int(sh_degree)
        self.density_scale = float(density_scale)
        self.shift = _softplus_inv(density_init / density_scale)
        self.raw_empty = _softplus_inv(empty_density / density_scale) - self.shift
        self.color_channels = 3 * (self.sh_degree + 1) ** 2
        n = int(res) ** 3
        init = [torch.zeros(n, 1), torch.zeros(n, self.color_channels)]
        self.grid = SparseVoxelGrid(int(res), [1, self.color_channels], [[self.raw_empty], [0.0] * self.color_channels],
                                    active, init)

    @property
    def res(self) -> int:
        return self.grid.res

    def config(self) -> dict[str, Any]:
        return {"kind": "grid", "res": self.res, "sh_degree": self.sh_degree, "density_scale": self.density_scale,
                "shift": self.shift, "raw_empty": self.raw_empty}

    def activate_density(self, raw: Tensor) -> Tensor:
        return F.softplus(raw + self.shift) * self.density_scale

    def activate_color(self, coeffs: Tensor, dirs: Tensor | None) -> Tensor:
        if self.sh_degree == 0 or dirs is None:
            return torch.sigmoid(coeffs[:, :3])
        basis = sh_basis(dirs, self.sh_degree) / 0.28209479177387814             # DC term = 1
        k = basis.shape[1]
        return torch.sigmoid((coeffs.view(-1, 3, k) * basis[:, None, :]).sum(-1))

    def locate(self, x01: Tensor) -> tuple[Tensor, Tensor]:
        """Interpolation data of points (corner rows, weights), reusable by the ``*_at`` methods."""
        return self.grid.corners(x01)

    def density_at(self, loc: tuple[Tensor, Tensor]) -> Tensor:
        return self.activate_density(self.grid.lookup(0, *loc)[:, 0])

    def forward_at(self, loc: tuple[Tensor, Tensor], dirs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raw = self.grid.lookup(0, *loc)[:, 0]
        col = self.grid.lookup(1, *loc)
        return self.activate_density(raw), self.activate_color(col, dirs)

    def forward(self, x01: Tensor, dirs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.forward_at(self.locate(x01), dirs)

    def density(self, x01: Tensor) -> Tensor:
        return self.density_at(self.locate(x01))

    @torch.no_grad()
    def vertex_density(self) -> Tensor:
        """Density at every vertex [R(z), R(y), R(x)]."""
        r = self.res
        return self.activate_density(self.grid.dense(0)[:, 0]).reshape(r, r, r)

    @torch.no_grad()
    def upsample(self, res: int) -> None:
        """Resample to ``res^3`` vertices (trilinear), all active until the next occupancy update."""
        if res != self.res:
            self.grid = self.grid.resampled(res)

    @torch.no_grad()
    def set_active_cells(self, cells: Tensor) -> Tensor:
        """Keep parameters only at the vertices of occupied cells (bool [R-1]^3). Returns the
        old-row index of each new table row (see :meth:`SparseVoxelGrid.remap`)."""
        return self.grid.remap(vertices_of_cells(cells).reshape(-1))

    def tv_loss(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Total variation on ``n`` random active vertices: mean squared difference to their +x,
        +y, +z neighbours (density to any neighbour, inactive ones reading the empty value; colour
        only between active vertices). Returns (density term, colour term) summed."""
        g = self.grid
        r = self.res
        act = g.rows.nonzero()[:, 0]
        if act.numel() == 0:
            return g.tables[0].sum() * 0.0
        pick = act[torch.randint(0, act.numel(), (n,), generator=generator).to(act.device)]
        x, y, z = pick % r, (pick // r) % r, pick // (r * r)
        r0 = g.rows[pick].long()
        d0 = g.tables[0][r0]
        c0 = g.tables[1][r0]
        dens, col = d0.sum() * 0.0, c0.sum() * 0.0
        for coord, stride in ((x, 1), (y, r), (z, r * r)):
            ok = coord < r - 1
            nb = g.rows[(pick + stride).clamp_max(r ** 3 - 1)].long()
            dd = (g.tables[0][nb] - d0)[:, 0]
            dens = dens + (dd * dd * ok).sum()
            both = ok & (nb > 0)
            dc = g.tables[1][nb] - c0
            col = col + ((dc * dc).sum(1) * both).sum()
        return (dens + col / self.color_channels) / n

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.grid.tables[0]], "lr": lr, "name": "density"},
                {"params": [self.grid.tables[1]], "lr": lr, "name": "color"}]

    def export_state(self) -> dict[str, Tensor]:
        return self.grid.export_state()

    def import_state(self, state: dict[str, Tensor]) -> None:
        self.grid = SparseVoxelGrid.from_state([1, self.color_channels], state)


class _TruncExp(torch.autograd.Function):
    """exp with the gradient clamped (instant-ngp's density activation)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(-15, 15))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


class HashField(nn.Module):
    kind = "hash"

    def __init__(self, levels: int = 16, features: int = 2, log2_table: int = 19, base_res: int = 16,
                 max_res: int = 512, hidden: int = 64, geo_features: int = 15, sh_degree: int = 3,
                 backend: str = "auto", seed: int = 0):
        """``backend``: "auto" (tiny-cuda-nn on CUDA when importable, else own encoding: Triton on
        CUDA, PyTorch on CPU), "tcnn", "triton" or "torch"."""
        super().__init__()
        self.cfg = dict(levels=levels, features=features, log2_table=log2_table, base_res=base_res, max_res=max_res,
                        hidden=hidden, geo_features=geo_features, sh_degree=sh_degree)
        self.backend = backend
        self.sh_degree = sh_degree
        self.encoding = HashGrid(levels, features, log2_table, base_res, max_res,
                                 backend="torch" if backend == "torch" else ("triton" if backend == "triton" else "auto"),
                                 seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        d_in = levels * features
        n_dir = (sh_degree + 1) ** 2
        self.density_net = nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.ReLU(),
                                         nn.Linear(hidden, 1 + geo_features, bias=False))
        self.color_net = nn.Sequential(nn.Linear(geo_features + n_dir, hidden, bias=False), nn.ReLU(),
                                       nn.Linear(hidden, hidden, bias=False), nn.ReLU(),
                                       nn.Linear(hidden, 3, bias=False))
        for m in list(self.density_net) + list(self.color_net):
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                with torch.no_grad():
                    m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
        self.tcnn: Any = None            # tiny-cuda-nn modules, built on first CUDA use

    def config(self) -> dict[str, Any]:
        return {"kind": "hash", **self.cfg}

    # -- tiny-cuda-nn (untested without a GPU) -------------------------------------------------------
    def _use_tcnn(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.backend in ("auto", "tcnn") and tcnn_available()

    def _tcnn_modules(self):
        if self.tcnn is None:
            import tinycudann as tcnn
            c = self.cfg
            enc = {"otype": "HashGrid", "n_levels": c["levels"], "n_features_per_level": c["features"],
                   "log2_hashmap_size": c["log2_table"], "base_resolution": c["base_res"],
                   "per_level_scale": self.encoding.spec.growth}
            dens = tcnn.NetworkWithInputEncoding(3, 1 + c["geo_features"], enc,
                                                 {"otype": "FullyFusedMLP", "activation": "ReLU",
                                                  "output_activation": "None", "n_neurons": c["hidden"],
                                                  "n_hidden_layers": 1})
            dir_enc = tcnn.Encoding(3, {"otype": "SphericalHarmonics", "degree": self.sh_degree + 1})
            col = tcnn.Network(c["geo_features"] + (self.sh_degree + 1) ** 2, 3,
                               {"otype": "FullyFusedMLP", "activation": "ReLU", "output_activation": "None",
                                "n_neurons": c["hidden"], "n_hidden_layers": 2})
            self.tcnn = nn.ModuleDict({"density": dens, "dir": dir_enc, "color": col}).cuda()
        return self.tcnn

    # -- evaluation ---------------------------------------------------------------------------------
    def _density_out(self, x01: Tensor) -> Tensor:
        if self._use_tcnn(x01.device):
            return self._tcnn_modules()["density"](x01).float()
        enc = self.encoding(x01)
        with torch.autocast("cuda", dtype=torch.float16, enabled=x01.device.type == "cuda"):
            return self.density_net(enc).float()

    def density(self, x01: Tensor) -> Tensor:
        return trunc_exp(self._density_out(x01)[:, 0] - 1.0)

    def forward(self, x01: Tensor, dirs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self._density_out(x01)
        sigma = trunc_exp(h[:, 0] - 1.0)
        if dirs is None:
            dirs = torch.zeros_like(x01)
            dirs[:, 2] = 1.0
        if self._use_tcnn(x01.device):
            m = self._tcnn_modules()
            sh = m["dir"]((dirs + 1) * 0.5)
            rgb = torch.sigmoid(m["color"](torch.cat([h[:, 1:], sh.float()], -1)).float())
            return sigma, rgb
        sh = sh_basis(dirs, self.sh_degree)
        with torch.autocast("cuda", dtype=torch.float16, enabled=x01.device.type == "cuda"):
            rgb = torch.sigmoid(self.color_net(torch.cat([h[:, 1:], sh], -1)).float())
        return sigma, rgb

    def export_state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def import_state(self, state: dict[str, Tensor]) -> None:
        if any(k.startswith("tcnn.") for k in state):
            self._tcnn_modules()
        self.load_state_dict(state)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        if self._use_tcnn(self.encoding.table.device):
            self._tcnn_modules()
            return [{"params": list(self.tcnn.parameters()), "lr": lr, "name": "tcnn", "eps": 1e-15}]
        return [{"params": [self.encoding.table], "lr": lr, "name": "table", "eps": 1e-15},
                {"params": list(self.density_net.parameters()) + list(self.color_net.parameters()), "lr": lr,
                 "name": "mlp", "weight_decay": 1e-6, "eps": 1e-15}]


def build_field(config: dict[str, Any]) -> nn.Module:
    """An (untrained) field from its :meth:`config`; load values with ``import_state``."""
    kind = config.get("kind", "grid")
    if kind == "grid":
        f = GridField(8, config.get("sh_degree", 0), config.get("density_scale", 100.0))
        f.shift = float(config["shift"])
        f.raw_empty = float(config["raw_empty"])
        return f
    if kind == "hash":
        keys = ("levels", "features", "log2_table", "base_res", "max_res", "hidden", "geo_features", "sh_degree")
        return HashField(**{k: config[k] for k in keys if k in config}, backend=config.get("backend", "auto"))
    raise ValueError(f"unknown field kind {kind!r}. Fix: use 'grid' or 'hash'")
