"""Feature Pyramid Network over named ResNet levels, and the backbone + FPN composition.

Level names: an input level ``c<k>`` becomes ``p<k>``; the top block adds ``p<k+1>`` (``maxpool``) or
``p<k+1>, p<k+2>`` (``p6p7``) above the highest input level. Submodule names (``inner_blocks.i.0``,
``layer_blocks.i.0``, ``extra_blocks.p6``) match torchvision's FeaturePyramidNetwork so its detection
checkpoints map with a prefix rename only.
"""
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from resdet.layers.conv import Conv2d
from resdet.layers.shape_spec import ShapeSpec

from .resnet import LEVELS, ResNet, build_resnet

__all__ = [
    "FPN",
    "TOP_BLOCKS",
    "BackboneWithFPN",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "build_resnet_fpn",
    "resnet_fpn_backbone",
]

TOP_BLOCKS = ("maxpool", "p6p7", None)
_P6P7_SOURCES = ("p5", "c5")


class LastLevelMaxPool(nn.Module):
    """One extra level: stride-2 subsampling of the top FPN output (``F.max_pool2d(p, 1, 2, 0)``)."""

    num_levels: int = 1

    def forward(self, p: Tensor, c: Tensor) -> list[Tensor]:
        return [F.max_pool2d(p, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """Two extra levels (RetinaNet): P6 = conv3×3/2(src), P7 = conv3×3/2(ReLU(P6)), src = P5 or C5."""

    num_levels: int = 2

    def __init__(self, in_channels: int, out_channels: int, *, use_p5: bool) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        self.use_p5 = use_p5

    def forward(self, p: Tensor, c: Tensor) -> list[Tensor]:
        p6 = self.p6(p if self.use_p5 else c)
        return [p6, self.p7(F.relu(p6))]


def _fpn_conv_block(cin: int, cout: int, kernel_size: int, norm: Optional[str]) -> nn.Sequential:
    conv = Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=norm is None)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    if norm is None:
        return nn.Sequential(conv)
    return nn.Sequential(conv, nn.GroupNorm(32, cout))


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017).

    Lateral 1×1 convs, top-down nearest-neighbour upsampling and addition, 3×3 output convs.

    Args:
        in_shapes: ``{level: ShapeSpec}`` of the input levels, any non-empty subset of ``c2..c5``
            (e.g. ``ResNet.output_shape()``).
        out_channels: channels of every output level.
        norm: ``None`` or ``"gn"`` (GroupNorm with 32 groups after every conv).
        top_block: ``"maxpool"`` (one extra level, the R-CNN default), ``"p6p7"`` (two, RetinaNet) or
            ``None``.
        p6p7_source: input of the ``p6p7`` block: ``"p5"`` (the top FPN output) or ``"c5"`` (the top
            backbone level).
    """

    def __init__(
        self,
        in_shapes: dict[str, ShapeSpec],
        *,
        out_channels: int = 256,
        norm: Optional[str] = None,
        top_block: Optional[str] = "maxpool",
        p6p7_source: str = "p5",
    ) -> None:
        super().__init__()
        names = [k for k in LEVELS if k in in_shapes]
        if not names or len(names) != len(in_shapes):
            raise ValueError(f"in_shapes keys must be a non-empty subset of {LEVELS}, got {list(in_shapes)}")
        if norm not in (None, "gn"):
            raise ValueError(f"FPN norm must be None or 'gn', got {norm!r}")
        if top_block not in TOP_BLOCKS:
            raise ValueError(f"unknown top_block {top_block!r}; expected one of {TOP_BLOCKS}")
        if p6p7_source not in _P6P7_SOURCES:
            raise ValueError(f"p6p7_source must be one of {_P6P7_SOURCES}, got {p6p7_source!r}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels}")
        self.in_features = names
        self.out_channels = out_channels
        self.inner_blocks = nn.ModuleList(
            [_fpn_conv_block(in_shapes[k].channels, out_channels, 1, norm) for k in names]
        )
        self.layer_blocks = nn.ModuleList([_fpn_conv_block(out_channels, out_channels, 3, norm) for _ in names])
        top = in_shapes[names[-1]]
        self.extra_blocks = None
        if top_block == "maxpool":
            self.extra_blocks = LastLevelMaxPool()
        elif top_block == "p6p7":
            use_p5 = p6p7_source == "p5"
            self.extra_blocks = LastLevelP6P7(out_channels if use_p5 else top.channels, out_channels, use_p5=use_p5)

        self._shapes: dict[str, ShapeSpec] = {
            "p" + k[1:]: ShapeSpec(out_channels, in_shapes[k].stride) for k in names
        }
        n_extra = 0 if self.extra_blocks is None else self.extra_blocks.num_levels
        level = int(names[-1][1:])
        for i in range(1, n_extra + 1):
            self._shapes[f"p{level + i}"] = ShapeSpec(out_channels, top.stride * 2**i)
        self.out_features = list(self._shapes)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every output level, finest first."""
        return dict(self._shapes)

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """Build the pyramid.

        Args:
            x: backbone features ``{c<k>: Tensor[N, C_k, H_k, W_k]}`` holding at least ``in_features``.

        Returns:
            ``{p<k>: Tensor[N, out_channels, H_k, W_k]}``, finest level first.
        """
        feats: list[Tensor] = []
        for name in self.in_features:
            if name not in x:
                raise KeyError(f"FPN expects input level '{name}'; got levels {list(x.keys())}")
            feats.append(x[name])
        laterals: list[Tensor] = []
        i = 0
        for block in self.inner_blocks:
            laterals.append(block(feats[i]))
            i += 1
        # Top-down pathway: upsample the coarser merged map to the lateral's size and add.
        for j in range(len(laterals) - 2, -1, -1):
            up = F.interpolate(laterals[j + 1], size=laterals[j].shape[-2:], mode="nearest")
            laterals[j] += up  # in place: the lateral conv's backward does not read its output
        results: list[Tensor] = []
        i = 0
        for block in self.layer_blocks:
            results.append(block(laterals[i]))
            i += 1
        if self.extra_blocks is not None:
            results.extend(self.extra_blocks(results[-1], feats[-1]))
        out: dict[str, Tensor] = OrderedDict()
        for name, value in zip(self.out_features, results):
            out[name] = value
        return out


class BackboneWithFPN(nn.Module):
    """A backbone (``body``) followed by an :class:`FPN` (``fpn``).

    Args:
        backbone: module returning ``{c<k>: Tensor}`` with ``output_shape()`` (e.g. :class:`ResNet`).
        fpn: the neck built on ``backbone.output_shape()``.
        torchvision_names: name outputs ``"0", "1", ..., "pool"`` (``"p6", "p7"`` for ``p6p7``) like
            torchvision's BackboneWithFPN instead of ``p2..p6``.

    Attributes:
        out_channels: channels of every output level (read by torchvision's detectors).
    """

    def __init__(self, backbone: nn.Module, fpn: FPN, *, torchvision_names: bool = False) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = fpn
        self.out_channels: int = fpn.out_channels
        self.torchvision_names = torchvision_names
        shapes = fpn.output_shape()
        if torchvision_names:
            n_in = len(fpn.in_features)
            extra = "pool" if isinstance(fpn.extra_blocks, LastLevelMaxPool) else None
            names = [str(i) if i < n_in else (extra or k) for i, k in enumerate(shapes)]
        else:
            names = list(shapes)
        self.out_features = names
        self._shapes = {new: shapes[old] for new, old in zip(names, shapes)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every output level under this module's names."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Map an image batch ``[N, C, H, W]`` to the ordered pyramid ``{name: Tensor[N, out_channels, h, w]}``."""
        pyramid = self.fpn(self.body(x))
        out: dict[str, Tensor] = OrderedDict()
        for name, value in zip(self.out_features, pyramid.values()):
            out[name] = value
        return out


def build_resnet_fpn(
    name: str,
    *,
    out_features: Sequence[str] = LEVELS,
    out_channels: int = 256,
    fpn_norm: Optional[str] = None,
    top_block: Optional[str] = "maxpool",
    p6p7_source: str = "p5",
    frozen_stages: Optional[int] = None,
    torchvision_names: bool = False,
    **backbone_options,
) -> BackboneWithFPN:
    """ResNet ``name`` + FPN with resdet level names (``p2..p6``).

    Args:
        name: backbone name, a key of :data:`resdet.backbones.RESNETS`.
        out_features: backbone levels fed to the FPN.
        out_channels: FPN channels.
        fpn_norm: ``None`` or ``"gn"``.
        top_block: ``"maxpool"``, ``"p6p7"`` or ``None``.
        p6p7_source: ``"p5"`` or ``"c5"``.
        frozen_stages: default 2 (stem + layer1, torchvision's ``trainable_layers=3``) when
            ``weights`` is given, else 0.
        torchvision_names: name outputs like torchvision (``"0".."3", "pool"``).
        **backbone_options: further :class:`ResNet` options (``weights``, ``norm``, ``output_stride``...).
    """
    if frozen_stages is None:
        frozen_stages = 2 if backbone_options.get("weights") is not None else 0
    body: ResNet = build_resnet(name, out_features=out_features, frozen_stages=frozen_stages, **backbone_options)
    fpn = FPN(body.output_shape(), out_channels=out_channels, norm=fpn_norm, top_block=top_block,
              p6p7_source=p6p7_source)
    return BackboneWithFPN(body, fpn, torchvision_names=torchvision_names)


def resnet_fpn_backbone(name: str, **options) -> BackboneWithFPN:
    """Drop-in ``backbone`` for torchvision's FasterRCNN / MaskRCNN / KeypointRCNN.

    Outputs are named ``"0", "1", "2", "3", "pool"`` so torchvision's default RoI poolers and anchor
    generator work unchanged; ``out_channels`` is set. ``options`` as :func:`build_resnet_fpn`.
    """
    options.setdefault("torchvision_names", True)
    return build_resnet_fpn(name, **options)
