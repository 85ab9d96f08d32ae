"""resdet ResNets as timm classifiers: ``timm.create_model("resdet_resnet50", ...)``,
``timm.create_model("resdet_cifar_resnet20", ...)``.

:class:`ResNetClassifier` is the detection :class:`~resdet.backbones.resnet.ResNet` (same stages, same
torchvision parameter names) plus timm's pooling + ``fc`` head and timm's model interface
(``feature_info``, ``forward_intermediates``, ``reset_classifier``, ``group_matcher`` ...), so every
features_only wrapper and ImageNet checkpoints of torchvision and timm work. :class:`CifarResNetClassifier`
does the same for the CIFAR trunk (:mod:`resdet.backbones.cifar_resnet`): the paper's whole CIFAR network.
Registered with timm's public API on ``import resdet``; names are prefixed ``resdet_`` and never replace
timm's own.
"""
from contextlib import nullcontext
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .cifar_resnet import CIFAR_DEPTHS, CifarResNet, Shortcut
from .resnet import LEVELS, BasicBlock, Block, Bottleneck, ResNet, check_image_batch
from .weights import IMAGENET_URLS

__all__ = ["CIFAR_MODEL_NAMES", "IMAGENET_MODEL_NAMES", "MODEL_NAMES", "CifarResNetClassifier", "ResNetClassifier"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# FX feature extraction (features_only, feature_cls="fx") calls the input check instead of tracing it.
register_notrace_function(check_image_batch)


class _TimmHead:
    """timm's interface shared by both classifiers: ``global_pool`` + dropout + ``fc`` on the last stage
    (``num_features`` channels), replaceable by :meth:`reset_classifier`; intermediate features and pruning
    over the trunk's children ``_TRUNK`` (run in that order) at the modules ``feature_info`` names. (No
    class annotations here: TorchScript would read them as attribute types.)"""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every residual block in the backward pass (saves activation memory)."""
        self.grad_checkpointing = enable
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                m.with_cp = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0: identity)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        device = self.conv1.weight.device
        dtype = self.conv1.weight.dtype
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.global_pool.to(device=device)
        self.fc.to(device=device, dtype=dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """The ``feature_info`` levels, timm's convention: the trunk's children run in order
        (``_TRUNK``) and the output of each child named in ``feature_info`` is taken.

        Args:
            x: image batch ``[N, in_chans, H, W]``.
            indices: last n features if int, all if None, those listed otherwise.
            norm: unused (no final norm in a ResNet).
            stop_early: stop after the last requested feature.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of features.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_image_batch(x, self.in_chans)
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        taps = {info["module"]: i for i, info in enumerate(self.feature_info)}
        last = self.feature_info[max_index]["module"]
        intermediates = []
        for name in self._TRUNK:
            x = getattr(self, name)(x)
            if taps.get(name, -1) in take_indices:
                intermediates.append(x)
            if stop_early and name == last:
                break
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the trunk children (and head) not needed for features ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last = self.feature_info[max_index]["module"]
        for name in self._TRUNK[self._TRUNK.index(last) + 1:]:
            setattr(self, name, nn.Sequential() if name.startswith("layer") else nn.Identity())
        pruned = max_index < len(self.feature_info) - 1
        if pruned:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout and classify (``pre_logits``: stop before ``fc``)."""
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)


class ResNetClassifier(_TimmHead, ResNet):
    """ImageNet-style classifier on the resdet ResNet trunk, honouring timm's model contract.

    ``feature_info`` follows timm's resnet layout: index 0 is the stride-2 stem (``act1``, 64 channels),
    indices 1..4 are ``layer1..layer4`` (C2..C5).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage.
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input channels.
        global_pool: timm pooling type (``avg``, ``max``, ``avgmax``, ``catavgmax``, ``""`` for none).
        drop_rate: dropout before the classifier.
        output_stride: 32, 16 or 8 (dilation in the last stages).
        groups: ResNeXt cardinality.
        width_per_group: bottleneck width per group.
        norm: ``bn``, ``frozen_bn``, ``sync_bn`` or ``gn``.
        zero_init_residual: zero the last norm scale of every block.
        device: device to build parameters on (e.g. ``"meta"``).
        dtype: parameter dtype.
    """

    _TRUNK = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")  # children in order

    def __init__(
        self,
        block: Block,
        layers: tuple[int, ...],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        output_stride: int = 32,
        groups: int = 1,
        width_per_group: int = 64,
        norm: str = "bn",
        zero_init_residual: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        with torch.device(device) if device is not None else nullcontext():
            super().__init__(
                block,
                layers,
                out_features=LEVELS,
                in_chans=in_chans,
                norm=norm,
                zero_init_residual=zero_init_residual,
                output_stride=output_stride,
                groups=groups,
                width_per_group=width_per_group,
            )
            self.num_classes = num_classes
            self.drop_rate = drop_rate
            self.grad_checkpointing = False
            shapes = self.output_shape()
            self.feature_info = [dict(num_chs=64, reduction=2, module="act1")] + [
                dict(num_chs=s.channels, reduction=s.stride, module=f"layer{i + 1}")
                for i, s in enumerate(shapes.values())
            ]
            self.num_features = self.head_hidden_size = shapes["c5"].channels
            self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        if dtype is not None:
            self.to(dtype=dtype)

    # ------------------------------------------------------------------------------ timm interface
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters into stem and blocks (layer-wise LR decay, freezing)."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: Tensor) -> Tensor:
        """Unpooled C5 features ``[N, num_features, H / 32, W / 32]``."""
        check_image_batch(x, self.in_chans)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Logits ``[N, num_classes]`` (or pooled / unpooled features after ``reset_classifier``)."""
        return self.forward_head(self.forward_features(x))


class CifarResNetClassifier(_TimmHead, CifarResNet):
    """The paper's CIFAR network (trunk, global average pooling, ``fc``) with timm's model interface.

    ``feature_info`` lists the three stages (``layer1..layer3``: 16, 32, 64 channels at strides 1, 2, 4):
    features_only gives those three levels.

    Args:
        layers: blocks per stage (``n, n, n`` for depth ``6n + 2``).
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input channels.
        shortcut: ``"A"`` (zero-padding identity, no parameters) or ``"B"`` (1×1 projection).
        global_pool: timm pooling type (``avg``, ``max``, ``avgmax``, ``catavgmax``, ``""`` for none).
        drop_rate: dropout before the classifier (the paper has none).
        norm: ``bn``, ``frozen_bn``, ``sync_bn`` or ``gn``.
        zero_init_residual: zero the last norm scale of every block.
        device: device to build parameters on (e.g. ``"meta"``).
        dtype: parameter dtype.
    """

    _TRUNK = ("conv1", "bn1", "act1", "layer1", "layer2", "layer3")  # children in order

    def __init__(
        self,
        layers: tuple[int, ...],
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: Shortcut = "A",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        norm: str = "bn",
        zero_init_residual: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        with torch.device(device) if device is not None else nullcontext():
            super().__init__(layers, shortcut=shortcut, in_chans=in_chans, norm=norm,
                             zero_init_residual=zero_init_residual)
            self.num_classes = num_classes
            self.drop_rate = drop_rate
            self.grad_checkpointing = False
            self.feature_info = [dict(num_chs=s.channels, reduction=s.stride, module=f"layer{i + 1}")
                                 for i, s in enumerate(self.output_shape().values())]
            self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
            self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        if dtype is not None:
            self.to(dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters into stem and blocks (layer-wise LR decay, freezing)."""
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: Tensor) -> Tensor:
        """Unpooled last-stage features ``[N, num_features, H / 4, W / 4]``."""
        check_image_batch(x, self.in_chans)
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Logits ``[N, num_classes]`` (or pooled / unpooled features after ``reset_classifier``)."""
        return self.forward_head(self.forward_features(x))


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "bsd-3-clause",
        "origin_url": "https://github.com/pytorch/vision",
        **kwargs,
    }


# torchvision's ImageNet weights load unchanged (same parameter names); downloaded only on pretrained=True,
# from the same URLs (so into the same torch.hub cache file) as the detectors' model.backbone_weights.
# The CIFAR variants have no published weights: one untagged config each, CIFAR-10 input and statistics.
default_cfgs = generate_default_cfgs({
    **{f"resdet_{name}.tv_in1k": _cfg(url) for name, url in IMAGENET_URLS.items()},
    **{f"resdet_cifar_resnet{d}": _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                                       mean=CIFAR10_MEAN, std=CIFAR10_STD, license="", origin_url="")
       for d in CIFAR_DEPTHS},
})

_ARCHS: dict[str, dict[str, Any]] = {
    "resdet_resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resdet_resnet34": dict(block=BasicBlock, layers=(3, 4, 6, 3)),
    "resdet_resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "resdet_resnet101": dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    "resdet_resnet152": dict(block=Bottleneck, layers=(3, 8, 36, 3)),
    "resdet_resnext50_32x4d": dict(block=Bottleneck, layers=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resdet_wide_resnet50_2": dict(block=Bottleneck, layers=(3, 4, 6, 3), width_per_group=128),
}
# Created through timm, the CIFAR networks start every block as its shortcut (the last norm's scale at zero),
# as timm's own ResNets do (zero_init_last): with the paper's plain init the eval-mode output of a fresh
# ResNet-1202 overflows (600 unnormalised residual additions). resdet.backbones.cifar_resnet*() keep the paper's.
_CIFAR_ARCHS: dict[str, dict[str, Any]] = {
    f"resdet_cifar_resnet{d}": dict(layers=((d - 2) // 6,) * 3, zero_init_residual=True) for d in CIFAR_DEPTHS
}
IMAGENET_MODEL_NAMES = tuple(_ARCHS)
CIFAR_MODEL_NAMES = tuple(_CIFAR_ARCHS)
MODEL_NAMES = IMAGENET_MODEL_NAMES + CIFAR_MODEL_NAMES


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if variant in _CIFAR_ARCHS:
        # three feature levels (layer1..3) instead of timm's default five
        return build_model_with_cfg(CifarResNetClassifier, variant, pretrained,
                                    feature_cfg=dict(out_indices=(0, 1, 2)), **dict(_CIFAR_ARCHS[variant], **kwargs))
    return build_model_with_cfg(ResNetClassifier, variant, pretrained, **dict(_ARCHS[variant], **kwargs))


def _make_entrypoint(variant: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"resdet {variant[len('resdet_'):]} classifier (torchvision parameter names)."
    return entrypoint


for _variant in MODEL_NAMES:
    # register_model reads this module's default_cfgs; skip names timm (or a reload) already holds.
    if not is_model(_variant):
        globals()[_variant] = register_model(_make_entrypoint(_variant))
