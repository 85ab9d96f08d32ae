"""Evaluators: COCO bbox/segm AP (pycocotools), VOC mAP@0.5, semantic mIoU, panoptic PQ,
classification accuracy."""
from .base import DatasetEvaluator, inference_on_dataset
from .classification import ClassificationEvaluator, topk_correct
from .coco_eval import COCOEvaluator, instances_to_coco_results
from .panoptic import PanopticEvaluator, pq_compute
from .sem_seg import SemSegEvaluator
from .voc_eval import VOCEvaluator, voc_ap, voc_class_ap

__all__ = [
    "ClassificationEvaluator",
    "DatasetEvaluator",
    "inference_on_dataset",
    "COCOEvaluator",
    "instances_to_coco_results",
    "SemSegEvaluator",
    "PanopticEvaluator",
    "pq_compute",
    "VOCEvaluator",
    "topk_correct",
    "voc_ap",
    "voc_class_ap",
]

