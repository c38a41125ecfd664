"""Evaluation: label-image matching metrics, COCO AP for cells, and the shared Evaluator."""

from .coco_metrics import CELL_AREA_RANGES, CocoImage, evaluate_coco
from .evaluator import Evaluator
from .matching import (
    DSB_THRESHOLDS,
    MatchCounts,
    Matching,
    dice,
    dsb_score,
    f1,
    iou_matrix,
    jaccard,
    match,
    merges,
    pixel_accuracy,
    pool,
    pq,
    precision,
    recall,
    splits,
)

__all__ = [
    "CELL_AREA_RANGES",
    "DSB_THRESHOLDS",
    "CocoImage",
    "Evaluator",
    "MatchCounts",
    "Matching",
    "dice",
    "dsb_score",
    "evaluate_coco",
    "f1",
    "iou_matrix",
    "jaccard",
    "match",
    "merges",
    "pixel_accuracy",
    "pool",
    "pq",
    "precision",
    "recall",
    "splits",
]
