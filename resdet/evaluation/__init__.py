"""Evaluators: COCO bbox/segm AP (pycocotools), VOC mAP@0.5, semantic mIoU, panoptic PQ."""
from .base import DatasetEvaluator, inference_on_dataset
from .coco_eval import COCOEvaluator, instances_to_coco_results
from .panoptic import PanopticEvaluator, pq_compute
from .sem_seg import SemSegEvaluator
from .voc_eval import VOCEvaluator, voc_ap, voc_class_ap

__all__ = [
    "DatasetEvaluator",
    "inference_on_dataset",
    "COCOEvaluator",
    "instances_to_coco_results",
    "SemSegEvaluator",
    "PanopticEvaluator",
    "pq_compute",
    "VOCEvaluator",
    "voc_ap",
    "voc_class_ap",
]

