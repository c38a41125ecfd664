"""Object sizes: equivalent diameters of label images and of COCO annotations.

Below the models and the inference code: a checkpoint records its training objects' median
diameter (:func:`annotation_diameter`), the U-Net watershed scales its smoothing with the
objects' size, and ``diameter=...`` at inference compares the two
(:mod:`cellrcnn.inference.scale`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def equivalent_diameter(area) -> np.ndarray:
    """Diameter of the disk with the same area (pixels, from areas in pixels)."""
    return np.sqrt(4.0 * np.asarray(area, dtype=np.float64) / math.pi)


BINCOUNT_CHUNK = 1 << 22  # label pixels counted at a time (32 MB of int64)


def object_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent diameter in pixels of every object of an H×W label image (0 = background)."""
    flat = np.asarray(labels).reshape(-1)
    n = int(flat.max(initial=0))
    areas = np.zeros(n + 1, np.int64)
    # counted in chunks: bincount's int64 copy of an 8000 × 8000 label image alone is 512 MB
    for start in range(0, flat.size, BINCOUNT_CHUNK):
        areas += np.bincount(flat[start : start + BINCOUNT_CHUNK].astype(np.int64, copy=False), minlength=n + 1)
    areas = areas[1:]
    return equivalent_diameter(areas[areas > 0])


MIN_OBJECTS = 5  # fewer objects measure no reliable median size


def median_diameter(labels: np.ndarray, min_objects: int = MIN_OBJECTS) -> float | None:
    """Median equivalent diameter (px) of the objects of a label image; None below ``min_objects``."""
    sizes = object_diameters(labels)
    return float(np.median(sizes)) if len(sizes) >= min_objects else None


def annotation_diameter(annotation_file: str | Path) -> float | None:
    """Median object diameter (pixels) of a COCO instance file; None when it has no objects.

    Masked objects count by their area; box-only ones (no ``segmentation``) by sqrt(w·h), the
    diameter of a disk filling the box.
    """
    from cellrcnn.data.coco import load_coco_json

    sizes = []
    for ann in load_coco_json(annotation_file)["annotations"]:
        if ann.get("iscrowd"):
            continue
        if ann.get("segmentation") and ann.get("area"):
            sizes.append(float(equivalent_diameter(ann["area"])))
        elif ann.get("bbox"):
            sizes.append(math.sqrt(max(float(ann["bbox"][2]) * float(ann["bbox"][3]), 0.0)))
    return float(np.median(sizes)) if sizes else None
