"""The Cityscapes label table (as in the official cityscapesScripts ``helpers/labels.py``).

``id`` is the value in ``*_gtFine_labelIds.png``; ``train_id`` the 19 evaluated classes (255 ignored);
``has_instances`` classes appear in ``*_gtFine_instanceIds.png`` as ``id * 1000 + k`` per instance, or as
plain ``id`` for a crowd/group region.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["CityscapesLabel", "LABELS", "TRAIN_ID_NAMES", "THING_NAMES", "LABEL_ID_TO_TRAIN_ID",
           "LABEL_ID_TO_THING", "label_ids_to_train_ids"]


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


LABELS = (
    CityscapesLabel("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
    CityscapesLabel("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
)

#: The 19 evaluated classes, index = train id.
TRAIN_ID_NAMES = tuple(label.name for label in sorted((lab for lab in LABELS if 0 <= lab.train_id < 255),
                                                      key=lambda lab: lab.train_id))
#: The 8 instance classes, contiguous label = index + 1.
THING_NAMES = tuple(lab.name for lab in LABELS if lab.has_instances and not lab.ignore_in_eval)

#: Lookup table: label id (0..255) → train id, 255 for ignored ids.
LABEL_ID_TO_TRAIN_ID = np.full(256, 255, dtype=np.int64)
for _label in LABELS:
    if _label.id >= 0:
        LABEL_ID_TO_TRAIN_ID[_label.id] = _label.train_id if _label.train_id >= 0 else 255

#: label id → contiguous thing label 1..8 for instance classes.
LABEL_ID_TO_THING = {lab.id: THING_NAMES.index(lab.name) + 1 for lab in LABELS if lab.name in THING_NAMES}


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Maps a labelIds map to train ids (255 = ignore); ids outside 0..255 become 255."""
    valid = (label_ids >= 0) & (label_ids < 256)
    out = np.full(label_ids.shape, 255, dtype=np.int64)
    out[valid] = LABEL_ID_TO_TRAIN_ID[label_ids[valid]]
    return out
