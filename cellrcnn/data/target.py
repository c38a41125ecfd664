"""The Target contract shared by the data layer, both model families and the evaluator.

A Target is a plain dict (torchvision detection models take dicts):

- ``boxes``: float32 N×4, ``x1, y1, x2, y2`` in pixels (x = column), x2/y2 exclusive.
- ``labels``: int64 N, category ids (1 = nucleus/cell for single-class sets).
- ``masks``: uint8 N×H×W, the instance masks (all zeros where ``has_mask`` is False).
- ``has_mask``: bool N, False for box-only annotations such as BBBC041.
- ``image_id``: int, the COCO image id.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch


class Target(TypedDict):
    boxes: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    image_id: int


def make_target(
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    has_mask: np.ndarray,
    image_id: int,
) -> Target:
    """Build a Target from numpy arrays, checking the shapes agree."""
    n = len(boxes)
    if not (len(labels) == len(masks) == len(has_mask) == n):
        raise ValueError(
            f"target of image {image_id}: {n} boxes, {len(labels)} labels, {len(masks)} masks, {len(has_mask)} has_mask"
        )
    return Target(
        boxes=torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
        labels=torch.as_tensor(np.asarray(labels, np.int64).reshape(-1)),
        masks=torch.as_tensor(np.asarray(masks, np.uint8)),
        has_mask=torch.as_tensor(np.asarray(has_mask, bool).reshape(-1)),
        image_id=int(image_id),
    )
