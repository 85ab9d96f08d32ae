"""DeepLab heads on a dilated ResNet: ASPP, DeepLabV3, DeepLabV3+ and the FCN head.

Shape shorthand:
    N       images in the batch
    C       channels of the input level (``in_channels``)
    D       ASPP / decoder channels (``channels``)
    K       semantic classes (``num_classes``)
    Hs, Ws  size of the deepest level (stride 16 or 8: the backbone's output stride)
    H4, W4  size of ``c2`` (stride 4)

Every head reads its levels from the backbone's feature dict and returns logits Tensor[N, K, h, w] at
its own stride (``Hs, Ws`` for DeepLabV3 and FCN, ``H4, W4`` for DeepLabV3+); the model upsamples them
to the input and takes the loss. Parameter names are torchvision's (``torchvision.models.segmentation``:
``DeepLabHead``, ``ASPP``, ``FCNHead``), so its ``deeplabv3_resnet50/101`` and ``fcn_resnet50/101``
state dicts load unchanged.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resdet.layers.blocks import init_convs_msra, make_norm
from resdet.layers.conv import Conv2d

__all__ = ["ASPP", "DeepLabV3Head", "DeepLabV3PlusHead", "FCNHead", "aspp_rates"]


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The published ASPP dilation rates: (6, 12, 18) at output stride 16, doubled at 8."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return tuple(r * 16 // output_stride for r in (6, 12, 18))  # type: ignore[return-value]


def _conv_norm_relu(cin: int, cout: int, kernel: int, *, norm: str, dilation: int = 1) -> list[nn.Module]:
    """[conv (no bias), norm, ReLU]: the three children of torchvision's ASPP / DeepLab blocks."""
    conv = Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False)
    return [conv, make_norm(norm, cout), nn.ReLU(inplace=True)]


def _separable_norm_relu(cin: int, cout: int, *, norm: str, dilation: int = 1) -> list[nn.Module]:
    """[depthwise 3×3, pointwise 1×1, norm, ReLU]: a depthwise separable conv, about 1/9 the cost of a full 3×3.

    Nothing between the depthwise and the pointwise conv (Xception's finding; segmentation_models_pytorch's
    layout). mmsegmentation's ``DepthwiseSeparableConvModule`` puts a norm and a ReLU there; in the shapes
    DeepLabV3+ (one seed, README) that layout reached a lower mIoU.
    """
    depthwise = Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False)
    return [depthwise, *_conv_norm_relu(cin, cout, 1, norm=norm)]


def _init_head(head: nn.Module, predictor: nn.Conv2d) -> None:
    """MSRA fill (fan_out, ReLU) for the convs, unit/zero norms, N(0, 0.01) for the classifier (mmseg's init).

    Depthwise convs take fan_in (9 taps): PyTorch's fan_out of a grouped conv ignores the groups (C·9 instead
    of 9), which would start them ~C^½ times too small, i.e. with a far larger effective learning rate
    behind their norm.
    """
    init_convs_msra(head)
    for m in head.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    for m in head.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(predictor.weight, std=0.01)
    nn.init.zeros_(predictor.bias)


class _ASPPPooling(nn.Sequential):
    """Image pooling branch: global average → 1×1 conv → norm → ReLU, broadcast back to Hs×Ws."""

    def __init__(self, in_channels: int, channels: int, *, norm: str) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_norm_relu(in_channels, channels, 1, norm=norm))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        y = super().forward(x)  # [N, D, 1, 1]
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017): a 1×1 branch, three dilated 3×3 branches and
    an image pooling branch, concatenated and projected to ``channels`` by a 1×1 conv.

    Args:
        in_channels: Channels C of the input level.
        rates: Dilations of the three 3×3 branches (:func:`aspp_rates` gives the published ones).
        channels: Channels D of every branch and of the output.
        norm: Norm after every conv (``bn``, ``sync_bn``, ``gn``, ``frozen_bn``).
        dropout: Dropout after the projection (torchvision: 0.5).
        separable: Depthwise separable dilated branches (mmsegmentation's DeepLabV3+) instead of full 3×3
            convs (torchvision's DeepLabV3).
    """

    def __init__(
        self,
        in_channels: int,
        rates: Sequence[int],
        *,
        channels: int = 256,
        norm: str = "bn",
        dropout: float = 0.5,
        separable: bool = False,
    ) -> None:
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"ASPP takes three dilation rates, got {list(rates)}")
        branches: list[nn.Module] = [nn.Sequential(*_conv_norm_relu(in_channels, channels, 1, norm=norm))]
        dilated = _separable_norm_relu if separable else functools.partial(_conv_norm_relu, kernel=3)
        branches += [nn.Sequential(*dilated(in_channels, channels, norm=norm, dilation=int(r))) for r in rates]
        branches.append(_ASPPPooling(in_channels, channels, norm=norm))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_norm_relu(len(branches) * channels, channels, 1, norm=norm),
                                     nn.Dropout(dropout))

    @property
    def rates(self) -> tuple[int, ...]:
        return tuple(int(self.convs[i][0].dilation[0]) for i in (1, 2, 3))

    def set_rates(self, rates: Sequence[int]) -> None:
        """Change the dilations of the 3×3 branches in place (same weights; DeepLab's output-stride switch)."""
        if len(rates) != 3:
            raise ValueError(f"ASPP takes three dilation rates, got {list(rates)}")
        for i, r in zip((1, 2, 3), rates):
            conv = self.convs[i][0]
            conv.dilation, conv.padding = (int(r), int(r)), (int(r), int(r))

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, C, Hs, Ws] → Tensor[N, D, Hs, Ws]."""
        # Five [N, D, Hs, Ws] branches concatenated on channels: [N, 5D, Hs, Ws].
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3Head(nn.Sequential):
    """DeepLabV3 (Chen et al. 2017) as torchvision builds it: ASPP → 3×3 conv → norm → ReLU → 1×1 classifier.

    Args:
        in_channels: Channels C of ``in_feature``.
        num_classes: Classes K.
        rates: ASPP dilations.
        in_feature: Backbone level read (``c5``).
        channels: ASPP and conv channels D.
        norm: Norm of every conv.
        dropout: ASPP dropout.
        separable: Depthwise separable dilated ASPP branches.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rates: Sequence[int],
        *,
        in_feature: str = "c5",
        channels: int = 256,
        norm: str = "bn",
        dropout: float = 0.5,
        separable: bool = False,
    ) -> None:
        super().__init__(
            ASPP(in_channels, rates, channels=channels, norm=norm, dropout=dropout, separable=separable),
            *_conv_norm_relu(channels, channels, 3, norm=norm),
            nn.Conv2d(channels, num_classes, 1),
        )
        self.in_feature = in_feature
        self.num_classes = num_classes
        _init_head(self, self[-1])

    @property
    def aspp(self) -> ASPP:
        return self[0]

    def forward(self, features: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        """Logits Tensor[N, K, Hs, Ws] from ``features[in_feature]``."""
        return super().forward(features[self.in_feature])


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): ASPP on the deep level, upsampled to ``c2`` and concatenated with a
    48-channel projection of it, two 3×3 convs, 1×1 classifier.

    Args:
        in_channels: Channels C of ``in_feature``.
        low_level_channels: Channels of ``low_level_feature`` (``c2``).
        num_classes: Classes K.
        rates: ASPP dilations.
        in_feature: Deep backbone level (``c5``).
        low_level_feature: Stride-4 backbone level (``c2``).
        channels: ASPP and decoder channels D.
        low_level_project: Channels of the ``c2`` projection (48 in the paper).
        norm: Norm of every conv.
        dropout: ASPP dropout.
        separable: Depthwise separable 3×3 convs in the ASPP and the decoder (the paper's final model,
            mmsegmentation and segmentation_models_pytorch) instead of full ones.
    """

    def __init__(
        self,
        in_channels: int,
        low_level_channels: int,
        num_classes: int,
        rates: Sequence[int],
        *,
        in_feature: str = "c5",
        low_level_feature: str = "c2",
        channels: int = 256,
        low_level_project: int = 48,
        norm: str = "bn",
        dropout: float = 0.5,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.in_feature, self.low_level_feature = in_feature, low_level_feature
        self.num_classes = num_classes
        self.aspp = ASPP(in_channels, rates, channels=channels, norm=norm, dropout=dropout, separable=separable)
        self.low_level = nn.Sequential(*_conv_norm_relu(low_level_channels, low_level_project, 1, norm=norm))
        conv3x3 = _separable_norm_relu if separable else functools.partial(_conv_norm_relu, kernel=3)
        self.fuse = nn.Sequential(*conv3x3(channels + low_level_project, channels, norm=norm),
                                  *conv3x3(channels, channels, norm=norm))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        _init_head(self, self.predictor)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Logits Tensor[N, K, H4, W4] from ``features[in_feature]`` and ``features[low_level_feature]``."""
        low = self.low_level(features[self.low_level_feature])  # [N, 48, H4, W4]
        x = self.aspp(features[self.in_feature])  # [N, D, Hs, Ws]
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.predictor(self.fuse(torch.cat([x, low], dim=1)))  # [N, D + 48, H4, W4] -> [N, K, H4, W4]


class FCNHead(nn.Sequential):
    """Fully convolutional head (torchvision's ``FCNHead``): 3×3 conv to C/4 → norm → ReLU → dropout 0.1
    → 1×1 classifier. The FCN model's classifier and the auxiliary head on ``c4``.

    Args:
        in_channels: Channels C of ``in_feature``.
        num_classes: Classes K.
        in_feature: Backbone level read.
        norm: Norm after the 3×3 conv.
        dropout: Dropout before the classifier.
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, in_feature: str = "c5", norm: str = "bn", dropout: float = 0.1
    ) -> None:
        inter = in_channels // 4
        super().__init__(*_conv_norm_relu(in_channels, inter, 3, norm=norm), nn.Dropout(dropout),
                         nn.Conv2d(inter, num_classes, 1))
        self.in_feature = in_feature
        self.num_classes = num_classes
        _init_head(self, self[-1])

    def forward(self, features: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        """Logits Tensor[N, K, Hs, Ws] from ``features[in_feature]``."""
        return super().forward(features[self.in_feature])
