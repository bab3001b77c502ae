"""Face crop and camera from a raw photo, in PanoHead's framing (``dp360rt crop``).

:func:`crop_portrait` detects the faces (dlib), takes the largest, and follows PanoHead's
``recrop_images.py``: FFHQ quad from the eyes and mouth, a generic 3D face fitted to the
landmarks to re-centre and re-scale the quad on the head and to give the camera, then the 563²
canvas resized to 512². Needs the ``crop`` extra (dlib and its landmark model file).
"""
from .face3d import GENERIC_FACE, FacePose, fit_pose
from .landmarks import CropDependencyError, Face, detect_faces
from .portrait import (CropResult, CropWarning, FaceCutByBorderError, FaceError, FaceIndexError, FaceNotFoundError,
                       FaceTooSmallError, OddScaleWarning, PoseBeyondFitWarning, RecropWarning, SeveralFacesWarning,
                       SmallFaceWarning, crop_portrait)
from .recipe import camera_from_rotation, ffhq_quad, yaw_pitch

__all__ = ["crop_portrait", "CropResult", "FaceError", "FaceNotFoundError", "FaceTooSmallError", "FaceCutByBorderError",
           "FaceIndexError", "CropWarning", "SeveralFacesWarning", "SmallFaceWarning", "OddScaleWarning", "RecropWarning",
           "PoseBeyondFitWarning", "CropDependencyError", "detect_faces", "Face",
           "fit_pose", "FacePose", "GENERIC_FACE", "camera_from_rotation", "ffhq_quad", "yaw_pitch"]
