"""Anchor grids for the RPN, one set of sizes and aspect ratios per feature level.

Shape shorthand:
    L  feature levels
    A  anchors per location on a level (len(sizes) * len(aspect_ratios))
    Hl, Wl  size of level l
    A_total = sum over levels of Hl * Wl * A

Numerics and ordering are torchvision's ``AnchorGenerator``: zero-centred base anchors rounded to
integers, ordered (aspect ratio, size); the grid is ordered (y, x, anchor) per level, levels concatenated;
the stride of a level is ``padded_size // level_size``; aspect ratio is height / width.
"""
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from resdet.layers.tracing import is_tracing

__all__ = ["AnchorGenerator"]


class AnchorGenerator(nn.Module):
    """Generates the anchors of every location of every feature level.

    Args:
        sizes: per level, the anchor sizes (square root of the area) in input pixels.
        aspect_ratios: per level, the height / width ratios.

    The module holds no parameters or buffers (its state dict is empty, as torchvision's).
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5,
    ) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"AnchorGenerator needs one entry per level in sizes and aspect_ratios, got {len(sizes)} sizes "
                f"and {len(aspect_ratios)} aspect ratio tuples"
            )
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(a) for a in aspect_ratios)
        self.cell_anchors = [self.base_anchors(s, a) for s, a in zip(self.sizes, self.aspect_ratios)]
        self._cache: dict[tuple, Tensor] = {}

    @staticmethod
    def base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
        """Zero-centred anchors ``(x1, y1, x2, y2)`` of one location, Tensor[A, 4], rounded to integers."""
        scales = torch.as_tensor(sizes, dtype=torch.float32)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        # Outer product flattened: index = ratio_index * len(sizes) + size_index.
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self) -> list[int]:
        """A for every level."""
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]]) -> list[Tensor]:
        """Per level the anchors Tensor[Hl * Wl * A, 4], ordered (y, x, anchor) (sizes: ints or traced
        0-dim tensors)."""
        anchors = []
        for (grid_h, grid_w), (stride_h, stride_w), base in zip(grid_sizes, strides, self.cell_anchors):
            shifts_x = torch.arange(grid_w, dtype=torch.int64) * stride_w
            shifts_y = torch.arange(grid_h, dtype=torch.int64) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            # [Hl * Wl, 4] location offsets, row-major (y outer, x inner).
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
            # [Hl * Wl, A, 4] -> [Hl * Wl * A, 4].
            anchors.append((shifts + base.reshape(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(self, image_size: tuple[int, int], feature_maps: list[Tensor]) -> Tensor:
        """Anchors of all levels, identical for every image of the batch.

        Args:
            image_size: ``(Hp, Wp)`` of the padded batch tensor (ints, or traced 0-dim tensors).
            feature_maps: per level Tensor[N, C, Hl, Wl].

        Returns:
            float32 Tensor[A_total, 4] on the device of the features (float32 whatever the features'
            dtype: box math stays in float32 under autocast).
        """
        if len(feature_maps) != len(self.cell_anchors):
            raise ValueError(
                f"AnchorGenerator has anchors for {len(self.cell_anchors)} levels but got {len(feature_maps)} "
                f"feature maps"
            )
        # Python ints in eager mode; traced 0-dim tensors under tracing, where the grid stays symbolic.
        grid_sizes = [(f.shape[-2], f.shape[-1]) for f in feature_maps]
        strides = [(image_size[0] // g[0], image_size[1] // g[1]) for g in grid_sizes]
        dtype, device = torch.float32, feature_maps[0].device
        if is_tracing():  # no cache: its key would be the example's sizes
            return torch.cat(self.grid_anchors(grid_sizes, strides)).to(dtype=dtype, device=device)
        key = (tuple(grid_sizes), tuple(strides), dtype, device)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = torch.cat(self.grid_anchors(grid_sizes, strides)).to(dtype=dtype, device=device)
            if len(self._cache) >= 16:  # multi-scale training: keep a few recent grids only
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = anchors
        return anchors
