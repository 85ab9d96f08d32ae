"""Evaluators: COCO bbox/segm AP (pycocotools), VOC mAP@0.5, semantic mIoU."""
from .base import DatasetEvaluator, inference_on_dataset
from .coco_eval import COCOEvaluator, instances_to_coco_results
from .sem_seg import SemSegEvaluator
from .voc_eval import VOCEvaluator, voc_ap, voc_class_ap

__all__ = [
    "DatasetEvaluator",
    "inference_on_dataset",
    "COCOEvaluator",
    "instances_to_coco_results",
    "SemSegEvaluator",
    "VOCEvaluator",
    "voc_ap",
    "voc_class_ap",
]

