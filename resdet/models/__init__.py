"""Detectors composed from resdet's backbones and heads, and their input transform.

``faster_rcnn()`` / ``mask_rcnn()`` build detectors with torchvision's default settings;
``from_torchvision()`` turns a torchvision Faster / Mask R-CNN (model or checkpoint) into an equivalent
resdet detector.
"""
from .builders import faster_rcnn, mask_rcnn
from .rcnn import GeneralizedRCNN, validate_inputs
from .torchvision_compat import convert_torchvision_state_dict, from_torchvision
from .transform import DetectionTransform

__all__ = [
    "DetectionTransform",
    "GeneralizedRCNN",
    "convert_torchvision_state_dict",
    "faster_rcnn",
    "from_torchvision",
    "mask_rcnn",
    "validate_inputs",
]

from .semantic_fpn import SemanticFPN, SemSegTransform, semantic_fpn  # noqa: E402  (helper F)

__all__ += ["SemanticFPN", "SemSegTransform", "semantic_fpn"]
