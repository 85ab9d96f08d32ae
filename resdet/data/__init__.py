"""Datasets (COCO, PASCAL VOC, Cityscapes, synthetic shapes), albumentations pipelines and batching.

Every dataset yields ``(image Tensor[3, H, W] float in [0, 1], target dict)``; see ``resdet.data.base`` for
the target keys.
"""
from . import shapes
from .base import IGNORE_LABEL, DetectionDatasetBase, masks_to_boxes
from .cityscapes import CityscapesDataset
from .cityscapes_labels import THING_NAMES as CITYSCAPES_THING_NAMES
from .cityscapes_labels import TRAIN_ID_NAMES as CITYSCAPES_TRAIN_ID_NAMES
from .coco import CocoDataset
from .convert import cityscapes_to_coco, voc_to_coco, write_json
from .image_io import ImageReadError, read_image, read_label_map
from .label_space import LabelSpace
from .samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_group_ids
from .shapes import ShapesDataset
from .transforms import DetectionTransforms, ResizeShortestEdge, build_transforms
from .voc import VOC_CLASSES, VOCDataset

__all__ = [
    "IGNORE_LABEL", "DetectionDatasetBase", "masks_to_boxes",
    "CocoDataset", "VOCDataset", "VOC_CLASSES", "CityscapesDataset", "CITYSCAPES_THING_NAMES",
    "CITYSCAPES_TRAIN_ID_NAMES", "ShapesDataset", "shapes",
    "voc_to_coco", "cityscapes_to_coco", "write_json",
    "ImageReadError", "read_image", "read_label_map",
    "build_transforms", "DetectionTransforms", "ResizeShortestEdge",
    "LabelSpace", "TrainingSampler", "GroupedBatchSampler", "InferenceSampler", "aspect_ratio_group_ids",
]
