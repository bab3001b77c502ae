"""What the two crop test files share: a crop with its warnings silenced and a quad's side."""
from __future__ import annotations

import warnings

import numpy as np


def quiet_crop(image, **kw):
    """:func:`dp360rt.crop.crop_portrait` without its warnings (small or turned test faces warn)."""
    from dp360rt.crop import crop_portrait
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return crop_portrait(image, **kw)


def quad_side(quad: np.ndarray) -> float:
    """The length of a crop quad's first side [4, 2] -> pixels."""
    return float(np.linalg.norm(quad[3] - quad[0]))
