"""Evaluation: COCO box/mask AP over base, novel and all classes (``detection``; an LVIS file gets
LVIS's federated protocol, ``lvis``) and semantic
segmentation mIoU over base, novel and all classes with hIoU (``segmentation``)."""

from distill.eval.detection import DetectionEvaluator, evaluate_detection, format_table
from distill.eval.segmentation import SemSegEvaluator, evaluate_semseg_dirs

__all__ = ["DetectionEvaluator", "evaluate_detection", "format_table", "SemSegEvaluator", "evaluate_semseg_dirs"]
