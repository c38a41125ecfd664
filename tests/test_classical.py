"""Otsu + watershed baseline on images whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellrcnn.baselines.classical import evaluate, foreground_mask, segment_otsu_watershed
from cellrcnn.data.synthetic import generate_dataset


def _disks(shape, disks):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return [((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) for cy, cx, r in disks]


def _best_iou(labels, mask):
    ious = [((labels == v) & mask).sum() / ((labels == v) | mask).sum() for v in range(1, labels.max() + 1)]
    return max(ious)


def _image(masks, dark=False, noise=0.02):
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(np.max(masks, axis=0).astype(np.float32), 1.0)
    image = image + rng.normal(0, noise, image.shape)
    return 1.0 - image if dark else image


@pytest.mark.parametrize("dark", [False, True], ids=["bright-on-dark", "dark-on-bright"])
def test_two_touching_disks_give_two_objects(dark):
    masks = _disks((64, 80), [(32, 28, 12), (32, 51, 12)])  # centres 23 px apart: they touch
    assert (masks[0] & ndimage.binary_dilation(masks[1])).any()
    labels = segment_otsu_watershed(_image(masks, dark))
    assert labels.max() == 2 and labels.dtype == np.int32
    assert all(_best_iou(labels, m) > 0.85 for m in masks)


def test_separate_disks_of_different_sizes_and_channel_input():
    masks = _disks((90, 90), [(20, 20, 6), (25, 65, 14), (70, 40, 10)])
    image = _image(masks)
    labels = segment_otsu_watershed(np.stack([image] * 3))  # C×H×W
    assert labels.max() == 3
    assert all(_best_iou(labels, m) > 0.8 for m in masks)


def test_blank_and_tiny_objects():
    assert segment_otsu_watershed(np.zeros((20, 30))).max() == 0
    image = np.zeros((40, 40), np.float32)
    image[5:8, 5:8] = 1  # 9 px: below min_size
    image[20:30, 20:30] = 1
    assert segment_otsu_watershed(image, min_size=15).max() == 1
    with pytest.raises(ValueError):
        segment_otsu_watershed(np.zeros((2, 3, 4, 5)))


def test_polarity_follows_the_border():
    masks = _disks((60, 60), [(30, 30, 20)])  # a large object, still inside the border
    assert foreground_mask(_image(masks))[30, 30] and foreground_mask(_image(masks, dark=True))[30, 30]


def test_evaluate_on_synthetic_split(tmp_path):
    root = generate_dataset(tmp_path / "syn", n_train=0, n_val=0, n_test=2, size=96, seed=0)
    metrics = evaluate(root, "test")
    assert metrics["n_images"] == 2 and 0 < metrics["dsb_score"] < 1 and 0 < metrics["f1@0.5"] <= 1
