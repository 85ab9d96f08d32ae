"""Metadata describing one feature map produced by a backbone or neck."""
from typing import NamedTuple

__all__ = ["ShapeSpec"]


class ShapeSpec(NamedTuple):
    """Channels and stride (input pixels per feature pixel) of one named feature level."""

    channels: int
    stride: int
