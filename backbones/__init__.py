"""ResNet backbones (C2–C5) and FPN necks.

Importing this package also registers the ``resdet_*`` classifiers with timm (``timm_models``).
"""
from .fpn import FPN, TOP_BLOCKS, BackboneWithFPN, LastLevelMaxPool, LastLevelP6P7, build_resnet_fpn, resnet_fpn_backbone
from resdet.layers.norm import NORMS, FrozenBatchNorm2d, get_norm
from .resnet import (
    LEVELS,
    RESNETS,
    BasicBlock,
    Bottleneck,
    ResNet,
    build_resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)
from resdet.layers.shape_spec import ShapeSpec
from .weights import load_checkpoint, load_resnet_weights
from . import timm_models  # noqa: E402  (registers resdet_* with timm)
from .timm_models import ResNetClassifier

__all__ = [
    "FPN",
    "LEVELS",
    "NORMS",
    "RESNETS",
    "TOP_BLOCKS",
    "BackboneWithFPN",
    "BasicBlock",
    "Bottleneck",
    "FrozenBatchNorm2d",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "ResNet",
    "ResNetClassifier",
    "ShapeSpec",
    "build_resnet",
    "build_resnet_fpn",
    "get_norm",
    "load_checkpoint",
    "load_resnet_weights",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_fpn_backbone",
    "resnext50_32x4d",
    "wide_resnet50_2",
]
