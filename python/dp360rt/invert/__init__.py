"""PanoHead inversion and 3D-aware noise (stage 1 of a generation from a raw photo).

* :class:`Inverter` — W projection + pivotal tuning with a VGG16 perceptual loss, then the 32
  feature frames at the orbit cameras (:mod:`.stage`, :mod:`.projector`)
* :func:`load_vgg` — NVIDIA's ``vgg16.pt`` read as data, never executed (:mod:`.vgg_file`)
* :class:`VGG16LPIPS` — the perceptual network in our own code (:mod:`.vgg`)
"""
from .projector import ProjectionLog, learning_rate, project_w, tune_pivot, w_statistics
from .stage import Inversion, Inverter, reference_draws, render_frames
from .vgg import VGG16LPIPS, ZeroPerceptual, random_vgg
from .vgg_file import UnsafeVGGFileError, VGGFileError, load_vgg

__all__ = ["Inverter", "Inversion", "ProjectionLog", "render_frames", "reference_draws", "project_w", "tune_pivot", "w_statistics",
           "learning_rate", "VGG16LPIPS", "ZeroPerceptual", "random_vgg", "load_vgg", "VGGFileError",
           "UnsafeVGGFileError"]
