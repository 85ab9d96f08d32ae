"""ResNet / ResNeXt / Wide-ResNet backbones returning named features ``c2..c5``.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1..layer4``, ``downsample``) so torchvision
and timm ImageNet checkpoints load unchanged. Channels follow from the block type: a stage with ``planes``
base width outputs ``planes * block.expansion`` channels.
"""
import os
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from resdet.layers.conv import Conv2d
from resdet.layers.norm import NORMS, conv_norm_forward, get_norm, is_norm, saving_folded_weights
from resdet.layers.policy import tracing
from resdet.layers.shape_spec import ShapeSpec

__all__ = [
    "LEVELS",
    "RESNETS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_resnet",
    "check_image_batch",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
]

LEVELS = ("c2", "c3", "c4", "c5")
_STAGE_PLANES = (64, 128, 256, 512)
_OUTPUT_STRIDES = (8, 16, 32)

PathLike = Union[str, os.PathLike]


def check_image_batch(x: Tensor, in_chans: int) -> None:
    """Raise unless ``x`` is a floating point ``[N, in_chans, H, W]`` batch."""
    if x.dim() != 4:
        raise ValueError(
            f"expected an image batch of shape [N, C, H, W] (4 dimensions), got {x.dim()} dimensions "
            f"with shape {list(x.shape)}; add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels (in_chans={in_chans}), got {x.shape[1]} channels in "
            f"input of shape {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating point image batch (float32/float16/bfloat16), got dtype {x.dtype}; "
            "convert uint8 images with x.float() / 255"
        )


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return Conv2d(
        cin, cout, 3, stride=stride, padding=dilation, groups=groups, dilation=dilation, bias=False
    )


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class _ResidualBlock(nn.Module):
    """Shared forward of the residual blocks: ``_inner`` optionally under gradient checkpointing."""

    with_cp: bool
    downsample: Optional[nn.Module]

    def _shortcut(self, x: Tensor) -> Tensor:
        ds = self.downsample
        if ds is None:
            return x
        if torch.jit.is_scripting():  # a constant to TorchScript: it compiles only this branch
            return ds(x)
        if isinstance(ds, nn.Sequential) and len(ds) == 2:
            return conv_norm_forward(ds[0], ds[1], x)  # (conv 1x1, norm): folds a frozen norm
        return ds(x)  # any other shortcut module (e.g. the CIFAR ResNets' parameter-free option A)

    def _inner(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def _checkpointed(self, x: Tensor) -> Tensor:
        with saving_folded_weights():  # the checkpoint's hooks must see every saved tensor
            return self._inner(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(self._checkpointed, x, use_reentrant=False)
        return self._inner(x)


class BasicBlock(_ResidualBlock):
    """Two 3×3 convolutions with a residual connection (ResNet-18/34). Supports dilation."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm: str = "bn",
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock supports only groups=1 and width_per_group=64, got groups={groups}, "
                f"width_per_group={base_width}; use a Bottleneck ResNet for ResNeXt / wide variants"
            )
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation=dilation)
        self.bn1 = get_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = get_norm(norm, planes)
        self.downsample = downsample
        self.stride = stride
        self.with_cp = with_cp

    def _inner(self, x: Tensor) -> Tensor:
        identity = self._shortcut(x)
        if torch.jit.is_scripting():  # TorchScript cannot pass modules to conv_norm_forward
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        else:
            out = self.relu(conv_norm_forward(self.conv1, self.bn1, x))
            out = conv_norm_forward(self.conv2, self.bn2, out)
        out += identity  # in place: no backward of the conv / norm before it reads its output
        return self.relu(out)

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(_ResidualBlock):
    """1×1 → 3×3 (stride, groups, dilation) → 1×1 bottleneck with a residual (ResNet-50+, V1.5)."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm: str = "bn",
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = get_norm(norm, width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = get_norm(norm, width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = get_norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.with_cp = with_cp

    def _inner(self, x: Tensor) -> Tensor:
        identity = self._shortcut(x)
        if torch.jit.is_scripting():  # TorchScript cannot pass modules to conv_norm_forward
            out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
            out = self.bn3(self.conv3(out))
        else:
            out = self.relu(conv_norm_forward(self.conv1, self.bn1, x))
            out = self.relu(conv_norm_forward(self.conv2, self.bn2, out))
            out = conv_norm_forward(self.conv3, self.bn3, out)
        out += identity  # in place: no backward of the conv / norm before it reads its output
        return self.relu(out)

    def last_norm(self) -> nn.Module:
        return self.bn3


Block = Union[type[BasicBlock], type[Bottleneck]]


def _stage_layout(num_stages: int, output_stride: int) -> list[tuple[int, int, int, int]]:
    """Per stage: (stride of its first block, dilation of its first block, dilation of the others,
    output stride after it). Strides beyond ``output_stride`` become dilation, as in torchvision's
    ``replace_stride_with_dilation``."""
    layout, stride_now, dilation = [], 4, 1
    for i in range(num_stages):
        stride = 1 if i == 0 else 2
        previous_dilation = dilation
        if stride_now * stride > output_stride:
            dilation, stride = dilation * stride, 1
        stride_now *= stride
        layout.append((stride, previous_dilation, dilation, stride_now))
    return layout


class _TrunkBase(nn.Module):
    """What the ResNet trunks (ImageNet and CIFAR) share: freezing the stem and the first stages, norm
    layers kept in eval mode, and the ``output_shape()`` of the returned levels. Subclasses set
    ``frozen_stages``, ``num_stages``, ``norm_eval``, ``out_features``, ``_shapes`` and the modules ``conv1``,
    ``bn1``, ``layer1`` ..."""

    def _init_weights(self, zero_init_residual: bool) -> None:
        """Kaiming normal (fan-out, ReLU) convolutions, unit-scale zero-shift norms; with
        ``zero_init_residual`` the last norm of every block starts at zero scale."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    last = m.last_norm()
                    if isinstance(last.weight, nn.Parameter):
                        nn.init.zeros_(last.weight)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules frozen by ``frozen_stages`` (stem, then ``layer1`` ... in order)."""
        modules: list[nn.Module] = []
        if self.frozen_stages >= 1:
            modules += [self.conv1, self.bn1]
        for i in range(1, min(self.frozen_stages, self.num_stages + 1)):
            modules.append(getattr(self, f"layer{i}"))
        return modules

    def _freeze(self) -> None:
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> "_TrunkBase":
        """Set train/eval mode; frozen stages (and all norms when ``norm_eval``) stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if is_norm(m):
                        m.eval()
        return self

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every returned level."""
        return {name: self._shapes[name] for name in self.out_features}


class ResNet(_TrunkBase):
    """ResNet trunk returning a dict of the requested levels among ``c2..c5`` (strides 4, 8, 16, 32).

    Only the stages up to the deepest requested level are built, so every parameter takes part in the
    loss. With ``output_stride`` 16 (8) the last (two last) stages replace their stride by dilation.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages.
        out_features: levels to return, a non-empty subset of ``c2, c3, c4, c5``.
        in_chans: input image channels.
        frozen_stages: 0 freezes nothing, 1 the stem, k the stem and the first k-1 stages (max 5).
            Frozen parameters get ``requires_grad=False`` and their norm layers stay in eval mode.
        norm: ``bn``, ``frozen_bn``, ``sync_bn`` or ``gn``; default ``frozen_bn`` when ``weights`` is
            given and ``bn`` otherwise (frozen statistics of a random backbone would disable
            normalization).
        norm_eval: keep every norm layer in eval mode (running statistics fixed) under ``train()``.
        zero_init_residual: zero the last norm's scale in every block (trainable norms only).
        output_stride: 32, 16 or 8.
        groups: convolution groups of the Bottleneck 3×3 (ResNeXt cardinality).
        width_per_group: Bottleneck width per group (64 = plain ResNet, 128 = wide ResNet-50-2).
        with_cp: gradient checkpointing of the blocks, one bool for all stages or one per stage.
        weights: path (or URL) of a torchvision / timm ImageNet checkpoint to load.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        out_features: Sequence[str] = LEVELS,
        in_chans: int = 3,
        frozen_stages: int = 0,
        norm: Optional[str] = None,
        norm_eval: bool = False,
        zero_init_residual: bool = False,
        output_stride: int = 32,
        groups: int = 1,
        width_per_group: int = 64,
        with_cp: Union[bool, Sequence[bool]] = False,
        weights: Optional[PathLike] = None,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
        out_features = tuple(out_features)
        unknown = [f for f in out_features if f not in LEVELS]
        if not out_features or unknown:
            raise ValueError(f"out_features must be a non-empty subset of {LEVELS}, got {out_features}")
        if not 0 <= frozen_stages <= 5:
            raise ValueError(
                f"frozen_stages must be in 0..5 (0 none, 1 stem, k stem + k-1 stages), got {frozen_stages}"
            )
        if norm is None:
            norm = "frozen_bn" if weights is not None else "bn"
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if output_stride not in _OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        cps = [bool(with_cp)] * 4 if isinstance(with_cp, bool) else [bool(c) for c in with_cp]
        if len(cps) != 4:
            raise ValueError(f"with_cp must be a bool or four bools (one per stage), got {with_cp!r}")

        self.out_features = [f for f in LEVELS if f in out_features]
        self.num_stages = LEVELS.index(self.out_features[-1]) + 1
        self.in_chans = in_chans
        self.frozen_stages = frozen_stages
        self.norm = norm
        self.norm_eval = norm_eval
        self.output_stride = output_stride

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = get_norm(norm, 64)
        self.act1 = nn.ReLU(inplace=True)  # timm's name; no parameters
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self._shapes = {}
        inplanes = 64
        layout = _stage_layout(self.num_stages, output_stride)
        for i, (stride, previous_dilation, dilation, stride_now) in enumerate(layout):
            planes = _STAGE_PLANES[i]
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    _conv1x1(inplanes, planes * block.expansion, stride),
                    get_norm(norm, planes * block.expansion),
                )
            common = dict(groups=groups, base_width=width_per_group, norm=norm, with_cp=cps[i])
            blocks = [
                block(inplanes, planes, stride=stride, downsample=downsample, dilation=previous_dilation, **common)
            ]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes, dilation=dilation, **common) for _ in range(1, int(layers[i]))]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self._shapes[LEVELS[i]] = ShapeSpec(channels=inplanes, stride=stride_now)

        self._init_weights(zero_init_residual)
        if weights is not None:
            from .weights import load_resnet_weights  # local import: weights.py imports this module

            load_resnet_weights(self, weights)
        self._freeze()

    # ----------------------------------------------------------------------------------------- set-up
    def set_output_stride(self, output_stride: int) -> None:
        """Re-lay the strides and dilations of the stages for ``output_stride`` (32, 16 or 8), in place.

        The weights are the same at every output stride; only the convolutions' stride, dilation and
        padding change (DeepLab trains at 16 and evaluates at 8 this way).
        """
        if output_stride not in _OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride}")
        layout = _stage_layout(self.num_stages, output_stride)
        for i, (stride, previous_dilation, dilation, stride_now) in enumerate(layout):
            for j, block in enumerate(getattr(self, f"layer{i + 1}")):
                d = previous_dilation if j == 0 else dilation
                for conv in (block.conv1, block.conv2) if isinstance(block, BasicBlock) else (block.conv2,):
                    conv.dilation, conv.padding = (d, d), (d, d)
                if j == 0:
                    strided = block.conv1 if isinstance(block, BasicBlock) else block.conv2
                    strided.stride = (stride, stride)
                    block.stride = stride
                    if block.downsample is not None:
                        block.downsample[0].stride = (stride, stride)
            self._shapes[LEVELS[i]] = ShapeSpec(channels=self._shapes[LEVELS[i]].channels, stride=stride_now)
        self.output_stride = output_stride

    # ---------------------------------------------------------------------------------------- forward
    def forward_stem(self, x: Tensor) -> Tensor:
        """conv1 → norm → ReLU → 3×3 max pool (stride 4 overall).

        On CPU an NCHW batch goes through the stem in channels-last memory and leaves it NCHW again:
        PyTorch's NCHW max pool is many times slower than its channels-last one, and oneDNN's 7×7
        convolution is faster in channels-last too (README, "Measured"). Same values and gradients up
        to float rounding. Tracers and exporters record the plain ops.
        """
        if torch.jit.is_scripting():  # TorchScript cannot pass modules to conv_norm_forward
            return self.maxpool(self.act1(self.bn1(self.conv1(x))))
        to_nchw = x.device.type == "cpu" and not tracing(x) and x.is_contiguous()
        if to_nchw:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.act1(conv_norm_forward(self.conv1, self.bn1, x)))
        return x.contiguous() if to_nchw else x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the trunk.

        Args:
            x: float image batch ``[N, in_chans, H, W]``.

        Returns:
            ``{level: Tensor[N, C_level, H / stride, W / stride]}`` for each level in ``out_features``.
        """
        check_image_batch(x, self.in_chans)
        x = self.forward_stem(x)
        out: dict[str, Tensor] = {}
        x = self.layer1(x)
        if "c2" in self.out_features:
            out["c2"] = x
        if hasattr(self, "layer2"):
            x = self.layer2(x)
            if "c3" in self.out_features:
                out["c3"] = x
        if hasattr(self, "layer3"):
            x = self.layer3(x)
            if "c4" in self.out_features:
                out["c4"] = x
        if hasattr(self, "layer4"):
            x = self.layer4(x)
            if "c5" in self.out_features:
                out["c5"] = x
        return out


def resnet18(**options) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); ``options`` are :class:`ResNet` keyword arguments."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **options)


def resnet34(**options) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3])."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **options)


def resnet50(**options) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **options)


def resnet101(**options) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3])."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **options)


def resnet152(**options) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3])."""
    return ResNet(Bottleneck, [3, 8, 36, 3], **options)


def resnext50_32x4d(**options) -> ResNet:
    """ResNeXt-50 32×4d (Bottleneck, [3, 4, 6, 3], 32 groups of width 4)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **options)


def wide_resnet50_2(**options) -> ResNet:
    """Wide ResNet-50-2 (Bottleneck, [3, 4, 6, 3], twice the bottleneck width)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=128, **options)


RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnext50_32x4d": resnext50_32x4d,
    "wide_resnet50_2": wide_resnet50_2,
}


def build_resnet(name: str, **options) -> ResNet:
    """Build the ResNet called ``name`` (a key of :data:`RESNETS`) with :class:`ResNet` options."""
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(RESNETS)}")
    return RESNETS[name](**options)
