"""ResNet backbones (C2–C5) and FPN necks."""
from .shape_spec import ShapeSpec

__all__ = ["ShapeSpec"]
