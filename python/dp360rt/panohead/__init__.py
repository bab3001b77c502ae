"""PanoHead (CVPR 2023) in dp360rt: the tri-grid generator DiffPortrait360's camera conditions and
3D-aware noise come from, loaded from the released pickle without executing anything it holds.

* :class:`TriPlaneGenerator` — ``G.mapping``, ``G.synthesis``, ``G(z, c)`` (see :mod:`.generator`)
* :func:`load_generator` — a converted ``.safetensors`` (fast) or the released ``.pkl``
* :func:`read_network_pickle` — the restricted reader of PanoHead network pickles
* :func:`render_conditions` — pose-hint images for any camera orbit (``dp360rt conditions``)
* :func:`verify` — a PanoHead fixture set's golden cases (``dp360rt panohead verify``)
"""
from .draws import Draws
from .generator import TriPlaneGenerator
from .weights import PanoHeadCheckpointError, build_generator, load_generator

__all__ = ["Draws", "TriPlaneGenerator", "PanoHeadCheckpointError", "build_generator", "load_generator"]
