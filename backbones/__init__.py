"""ResNet backbones (C2–C5) and FPN necks; the CIFAR ResNets of the ResNet paper.

Importing this package also registers the ``resdet_*`` classifiers with timm (``timm_models``).
"""
from resdet.layers.norm import NORMS, FrozenBatchNorm2d, get_norm
from resdet.layers.shape_spec import ShapeSpec

from . import timm_models  # noqa: F401  (registers resdet_* with timm)
from .cifar_resnet import (
    CIFAR_RESNETS,
    CifarResNet,
    ShortcutA,
    build_cifar_resnet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
    cifar_resnet1202,
)
from .fpn import (
    FPN,
    TOP_BLOCKS,
    BackboneWithFPN,
    LastLevelMaxPool,
    LastLevelP6P7,
    build_resnet_fpn,
    resnet_fpn_backbone,
)
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
from .timm_models import CifarResNetClassifier, ResNetClassifier
from .weights import load_checkpoint, load_resnet_weights

__all__ = [
    "CIFAR_RESNETS",
    "CifarResNet",
    "CifarResNetClassifier",
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
    "ShortcutA",
    "build_cifar_resnet",
    "build_resnet",
    "build_resnet_fpn",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet1202",
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
