"""The CIFAR ResNets of He et al. (2015), §4.2 and Table 6: ResNet-20/32/44/56/110/1202.

A 3×3 convolution with 16 filters, then three stages of ``n`` :class:`~resdet.backbones.resnet.BasicBlock`
with 16, 32 and 64 filters on 32×32, 16×16 and 8×8 maps (for 32×32 input), then (in the classifier)
global average pooling and a fully connected layer: ``6n + 2`` weighted layers. The blocks are resdet's
own BasicBlock; only the shortcut at a stage change differs between the paper's two options:

* ``"A"`` — parameter-free: the input subsampled by the stride (``x[:, :, ::2, ::2]``) with zero
  channels appended (:class:`ShortcutA`). Table 6's parameter counts are for this option.
* ``"B"`` — a 1×1 convolution with stride and a norm layer (``downsample.0`` / ``downsample.1``, the
  torchvision names).

Feature levels are named by stage as in the ImageNet trunk (``c2``, ``c3``, ``c4`` for conv2_x..conv4_x of
the paper's notation) but their strides are 1, 2 and 4 (:meth:`CifarResNet.output_shape` says so): the
stem keeps the resolution. Parameter names are ``conv1``, ``bn1``, ``layer1..layer3``, ``fc``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resdet.layers.norm import NORMS, conv_norm_forward, get_norm
from resdet.layers.shape_spec import ShapeSpec

from .resnet import BasicBlock, _TrunkBase, check_image_batch

__all__ = [
    "CIFAR_DEPTHS",
    "CIFAR_LEVELS",
    "CIFAR_RESNETS",
    "PAPER_PARAMS",
    "CifarResNet",
    "ShortcutA",
    "build_cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet1202",
]

CIFAR_LEVELS = ("c2", "c3", "c4")
_STAGE_PLANES = (16, 32, 64)
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
PAPER_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}
"""Parameters of each depth in the paper's Table 6 (option A shortcuts, 10 classes)."""

Shortcut = Literal["A", "B"]


class ShortcutA(nn.Module):
    """The paper's option A shortcut: identity on the kept channels, zeros on the new ones; no parameters.

    ``[N, C_in, H, W] -> [N, C_out, ceil(H / stride), ceil(W / stride)]`` (the size of a 3×3 stride-s
    convolution with padding 1), the first ``C_in`` channels the subsampled input, the rest zero.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # pad (W: 0, 0), (H: 0, 0), (C: 0, extra): zero channels after the existing ones
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))


class CifarResNet(_TrunkBase):
    """CIFAR ResNet trunk returning a dict of the requested levels among ``c2, c3, c4`` (strides 1, 2, 4).

    Args:
        layers: blocks in each of the three stages (``n, n, n`` for depth ``6n + 2``).
        shortcut: ``"A"`` (parameter-free, the paper's CIFAR choice) or ``"B"`` (1×1 projection) at the
            stage changes.
        out_features: levels to return, a non-empty subset of ``c2, c3, c4``.
        in_chans: input image channels.
        norm: ``bn``, ``frozen_bn``, ``sync_bn`` or ``gn``.
        norm_eval: keep every norm layer in eval mode under ``train()``.
        frozen_stages: 0 freezes nothing, 1 the stem, k the stem and the first k-1 stages (max 4).
        zero_init_residual: zero the last norm's scale in every block (each block starts as its shortcut).
        with_cp: gradient checkpointing of the blocks.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        shortcut: Shortcut = "A",
        out_features: Sequence[str] = CIFAR_LEVELS,
        in_chans: int = 3,
        norm: str = "bn",
        norm_eval: bool = False,
        frozen_stages: int = 0,
        zero_init_residual: bool = False,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 3 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be three positive block counts, got {list(layers)}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding identity) or 'B' (1x1 projection), got {shortcut!r}")
        out_features = tuple(out_features)
        if not out_features or any(f not in CIFAR_LEVELS for f in out_features):
            raise ValueError(f"out_features must be a non-empty subset of {CIFAR_LEVELS}, got {out_features}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4 (0 none, 1 stem, k stem + k-1 stages), "
                             f"got {frozen_stages}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        self.layers = tuple(int(n) for n in layers)
        self.shortcut = shortcut
        self.out_features = [f for f in CIFAR_LEVELS if f in out_features]
        self.in_chans = in_chans
        self.norm = norm
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        self.num_stages = 3

        self.conv1 = nn.Conv2d(in_chans, _STAGE_PLANES[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = get_norm(norm, _STAGE_PLANES[0])
        self.act1 = nn.ReLU(inplace=True)
        self._shapes = {}
        inplanes, stride_now = _STAGE_PLANES[0], 1
        for i, (planes, n) in enumerate(zip(_STAGE_PLANES, self.layers)):
            stride = 1 if i == 0 else 2
            stride_now *= stride
            downsample: nn.Module | None = None
            if stride != 1 or inplanes != planes:
                downsample = (ShortcutA(inplanes, planes, stride) if shortcut == "A" else
                              nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            get_norm(norm, planes)))
            blocks = [BasicBlock(inplanes, planes, stride=stride, downsample=downsample, norm=norm, with_cp=with_cp)]
            blocks += [BasicBlock(planes, planes, norm=norm, with_cp=with_cp) for _ in range(1, n)]
            inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self._shapes[CIFAR_LEVELS[i]] = ShapeSpec(channels=planes, stride=stride_now)

        self._init_weights(zero_init_residual)  # Kaiming (fan-out) convolutions, unit norms
        self._freeze()

    @property
    def depth(self) -> int:
        """Weighted layers: two per block, the stem convolution and the classifier (``6n + 2``)."""
        return 2 * sum(self.layers) + 2

    def forward_stem(self, x: Tensor) -> Tensor:
        """3×3 conv (16 filters, stride 1) → norm → ReLU."""
        if torch.jit.is_scripting():  # TorchScript cannot pass modules to conv_norm_forward
            return self.act1(self.bn1(self.conv1(x)))
        return self.act1(conv_norm_forward(self.conv1, self.bn1, x))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the trunk.

        Args:
            x: float image batch ``[N, in_chans, H, W]``.

        Returns:
            ``{level: Tensor[N, C_level, H / stride, W / stride]}`` for each level in ``out_features``.
        """
        check_image_batch(x, self.in_chans)
        x = self.layer1(self.forward_stem(x))
        out: dict[str, Tensor] = {}
        if "c2" in self.out_features:
            out["c2"] = x
        x = self.layer2(x)
        if "c3" in self.out_features:
            out["c3"] = x
        x = self.layer3(x)
        if "c4" in self.out_features:
            out["c4"] = x
        return out


def _blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has 6n + 2 layers (20, 32, 44, 56, 110, 1202, ...), got depth {depth}")
    return (depth - 2) // 6


CIFAR_RESNETS: dict[str, int] = {f"cifar_resnet{d}": d for d in CIFAR_DEPTHS}
"""Backbone name → depth."""


def build_cifar_resnet(name: str, **options) -> CifarResNet:
    """The trunk (no classifier) of the CIFAR ResNet called ``name`` (a key of :data:`CIFAR_RESNETS`, or
    ``cifar_resnet<6n+2>``) with :class:`CifarResNet` options."""
    depth_text = name.removeprefix("cifar_resnet")
    if not name.startswith("cifar_resnet") or not depth_text.isdigit():
        raise ValueError(f"unknown CIFAR backbone {name!r}; expected one of {sorted(CIFAR_RESNETS, key=len)}")
    n = _blocks_per_stage(int(depth_text))
    return CifarResNet((n, n, n), **options)


def _classifier(depth: int, num_classes: int, shortcut: Shortcut, options: dict):
    from .timm_models import CifarResNetClassifier  # local import: timm_models imports this module

    n = _blocks_per_stage(depth)
    return CifarResNetClassifier((n, n, n), num_classes=num_classes, shortcut=shortcut, **options)


def _make(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, shortcut: Shortcut = "A", **options):
        return _classifier(depth, num_classes, shortcut, options)

    build.__name__ = build.__qualname__ = f"cifar_resnet{depth}"
    build.__doc__ = (f"ResNet-{depth} for CIFAR ({(depth - 2) // 6} blocks per stage, paper: "
                     f"{PAPER_PARAMS[depth] / 1e6:g}M parameters): the whole network, pooling and ``fc`` "
                     f"included, as :class:`~resdet.backbones.timm_models.CifarResNetClassifier` (``options``: "
                     f"its keyword arguments, e.g. ``zero_init_residual``, ``norm``, ``in_chans``).")
    return build


cifar_resnet20 = _make(20)
cifar_resnet32 = _make(32)
cifar_resnet44 = _make(44)
cifar_resnet56 = _make(56)
cifar_resnet110 = _make(110)
cifar_resnet1202 = _make(1202)
