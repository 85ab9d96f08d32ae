"""Models composed from resdet's backbones and heads, their input transforms, and the registry that
builds one from a config.

``faster_rcnn()`` / ``mask_rcnn()`` build detectors with torchvision's default settings, ``semantic_fpn()``
a semantic FPN, ``panoptic_fpn()`` a Panoptic FPN, ``deeplabv3()`` / ``deeplabv3plus()`` / ``fcn()`` DeepLab
and FCN on a dilated ResNet, ``classifier()`` an image classifier on any resdet backbone; each is
registered under its ``model.arch`` name (``registry.py``), and
``build_model(cfg)`` builds the one a config names. ``from_torchvision()`` turns a torchvision Faster /
Mask R-CNN, DeepLabV3 or FCN (model or checkpoint) into an equivalent resdet model.
"""
from .builders import faster_rcnn, mask_rcnn
from .classifier import ClassificationTransform, ImageClassifier, classifier
from .deeplab import DeepLab, deeplabv3, deeplabv3plus, fcn
from .panoptic_fpn import PanopticFPN, combine_panoptic, panoptic_fpn
from .panoptic_transform import PanopticTransform
from .rcnn import GeneralizedRCNN
from .registry import TASKS, arch_names, arch_options, arch_task, build_model, get_arch, register_arch
from .semantic import SemanticSegmentor, SemSegTransform
from .semantic_fpn import SemanticFPN, semantic_fpn
from .torchvision_compat import convert_torchvision_state_dict, from_torchvision
from .transform import DetectionTransform
from .validation import validate_inputs

__all__ = [
    "ClassificationTransform",
    "DeepLab",
    "DetectionTransform",
    "GeneralizedRCNN",
    "ImageClassifier",
    "PanopticFPN",
    "PanopticTransform",
    "SemSegTransform",
    "SemanticFPN",
    "SemanticSegmentor",
    "TASKS",
    "arch_names",
    "arch_options",
    "arch_task",
    "build_model",
    "classifier",
    "combine_panoptic",
    "convert_torchvision_state_dict",
    "deeplabv3",
    "deeplabv3plus",
    "faster_rcnn",
    "fcn",
    "from_torchvision",
    "get_arch",
    "mask_rcnn",
    "panoptic_fpn",
    "register_arch",
    "semantic_fpn",
    "validate_inputs",
]
