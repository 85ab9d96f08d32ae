"""Datasets (COCO, PASCAL VOC, Cityscapes, synthetic shapes; CIFAR and image folders for classification),
albumentations pipelines and batching.

Every dataset yields ``(image Tensor[3, H, W] float in [0, 1], target dict)``; see ``resdet.data.base`` for
the target keys.
"""
from . import shapes
from .base import IGNORE_LABEL, DetectionDatasetBase, masks_to_boxes
from .cifar import CifarDataset, CifarFormatError, write_cifar
from .cityscapes import CityscapesDataset
from .cityscapes_labels import THING_NAMES as CITYSCAPES_THING_NAMES
from .cityscapes_labels import TRAIN_ID_NAMES as CITYSCAPES_TRAIN_ID_NAMES
from .coco import CocoDataset
from .convert import cityscapes_to_coco, voc_to_coco, write_json
from .image_folder import ImageFolderDataset
from .image_io import ImageReadError, read_image, read_label_map
from .label_space import LabelSpace
from .samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler, aspect_ratio_group_ids
from .shapes import ShapesDataset
from .transforms import (
                         ClassificationTransforms,
                         DetectionTransforms,
                         ResizeShortestEdge,
                         build_classification_transforms,
                         build_transforms,
)
from .voc import VOC_CLASSES, VOCDataset

__all__ = [
    "IGNORE_LABEL", "DetectionDatasetBase", "masks_to_boxes",
    "CocoDataset", "VOCDataset", "VOC_CLASSES", "CityscapesDataset", "CITYSCAPES_THING_NAMES",
    "CITYSCAPES_TRAIN_ID_NAMES", "ShapesDataset", "shapes",
    "voc_to_coco", "cityscapes_to_coco", "write_json",
    "ImageReadError", "read_image", "read_label_map",
    "build_transforms", "DetectionTransforms", "ResizeShortestEdge", "ClassificationTransforms",
    "build_classification_transforms", "CifarDataset", "CifarFormatError", "write_cifar", "ImageFolderDataset",
    "LabelSpace", "TrainingSampler", "GroupedBatchSampler", "InferenceSampler", "aspect_ratio_group_ids",
]
