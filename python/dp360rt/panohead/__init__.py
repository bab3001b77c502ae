"""PanoHead (CVPR 2023) in dp360rt: the tri-grid generator DiffPortrait360's camera conditions and
3D-aware noise come from, loaded from the released pickle without executing anything it holds.

* :class:`TriPlaneGenerator` — ``G.mapping``, ``G.synthesis``, ``G(z, c)`` (see :mod:`.generator`)
* :func:`load_generator` — a converted ``.safetensors`` (fast) or the released ``.pkl``
* :func:`read_network_pickle` — the restricted reader of PanoHead network pickles
* :func:`orbit`, :func:`render_conditions` — pose-hint images for any camera orbit (``dp360rt conditions``)
* :func:`verify` — a PanoHead fixture set's golden cases (``dp360rt panohead verify``)
"""
from .cameras import diffportrait_orbit, lookat_label, orbit
from .conditions import render_conditions
from .draws import Draws
from .generator import TriPlaneGenerator
from .pickle_reader import PanoHeadCheckpointError, UnsafePickleError, read_network_pickle
from .verify import verify
from .weights import build_generator, load_generator

__all__ = ["Draws", "TriPlaneGenerator", "PanoHeadCheckpointError", "UnsafePickleError", "build_generator",
           "load_generator", "read_network_pickle", "orbit", "diffportrait_orbit", "lookat_label",
           "render_conditions", "verify"]
