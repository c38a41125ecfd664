"""Known-answer tests for U-Net targets, seeded watershed and label-image conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellrcnn.data.masks import masks_to_label_image, object_slices
from cellrcnn.models.postprocess import (
    drop_low_scores,
    labels_to_instances,
    median_diameter,
    targets_to_unet_maps,
    unet_outputs_to_labels,
)


def disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.uint8)


def ideal_probs(class_map: np.ndarray) -> np.ndarray:
    """One-hot 3×H×W probabilities: what a perfect network would output."""
    return np.stack([class_map == k for k in range(3)]).astype(np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return (a & b).sum() / (a | b).sum()


def best_ious(gt: np.ndarray, pred: np.ndarray) -> list[float]:
    return [max(iou(g, p) for p in pred) for g in gt]


def test_touching_squares_get_a_boundary_between_them():
    masks = np.zeros((2, 20, 30), np.uint8)
    masks[0, 5:15, 2:12] = 1
    masks[1, 5:15, 12:22] = 1  # shares the column border 11|12 with the first
    class_map, distance = targets_to_unet_maps(masks)
    # both columns at the contact are boundary over the full height of the squares
    assert (class_map[5:15, 11] == 2).all() and (class_map[5:15, 12] == 2).all()
    # the interiors are one 8-by-8 block each and do not touch
    assert (class_map[6:14, 3:11] == 1).all() and (class_map[6:14, 13:21] == 1).all()
    assert (class_map == 1).sum() == 2 * 64
    assert (class_map[masks.sum(0) == 0] == 0).all()
    # distance: 0 outside, 1 at each object's centre line, 1 / max at the edge
    assert distance[masks.sum(0) == 0].max() == 0
    assert distance[10, 6] == pytest.approx(1.0) and distance[10, 16] == pytest.approx(1.0)
    assert distance[10, 11] == pytest.approx(0.2) and distance[10, 12] == pytest.approx(0.2)


def test_overlap_is_boundary_and_wider_boundary():
    masks = np.zeros((2, 30, 30), np.uint8)
    masks[0, 5:20, 5:20] = 1
    masks[1, 10:25, 10:25] = 1
    class_map, _ = targets_to_unet_maps(masks)
    assert (class_map[10:20, 10:20] == 2).all()  # the overlap is cut out as boundary
    one, _ = targets_to_unet_maps(masks[:1])
    two, _ = targets_to_unet_maps(masks[:1], boundary_width=2)
    assert (one == 2).sum() == 4 * 14 and (two == 2).sum() == 4 * 14 + 4 * 12
    assert ((one > 0) == (two > 0)).all()


def test_empty_targets():
    class_map, distance = targets_to_unet_maps(np.zeros((0, 8, 9), np.uint8))
    assert class_map.shape == (8, 9) and class_map.max() == 0 and distance.max() == 0


@pytest.mark.parametrize(
    "seed_method, scale, smooth",
    [("core", 1.0, 0.0), ("hmaxima", 1.0, 0.0), ("hmaxima", 1.0, 2.0), ("hmaxima", 0.5, 2.0)],
)
def test_two_touching_disks_are_two_instances(seed_method, scale, smooth):
    """Ideal maps; ``scale`` 0.5 mimics a distance head whose output never exceeds 0.5."""
    shape = (64, 80)
    gt = np.stack([disk(shape, 32, 25, 12), disk(shape, 32, 49, 12)])
    gt[1][gt[0] > 0] = 0  # touching along a line, no overlap
    assert (gt[0][:, :-1] & gt[1][:, 1:]).any()  # they do touch: left pixel in one, right in the other
    class_map, distance = targets_to_unet_maps(gt)
    labels, scores = unet_outputs_to_labels(
        ideal_probs(class_map), scale * distance, seed_method=seed_method, smooth=smooth
    )
    assert labels.max() == 2 and scores.shape == (2,)
    np.testing.assert_allclose(scores, 1.0)
    inst = labels_to_instances(labels, scores)
    assert min(best_ious(gt, inst["masks"].numpy())) > 0.9


def test_smoothing_follows_object_size():
    """A 90-px nucleus whose distance map has a groove through its centre (a ragged top) is one
    object with the size-proportional smoothing, two with a fixed 2-px sigma; small touching
    nuclei keep their split (their sigma stays at ``smooth``)."""
    shape = (120, 120)
    gt = disk(shape, 60, 60, 45)[None]
    class_map, distance = targets_to_unet_maps(gt)
    xx = np.mgrid[: shape[0], : shape[1]][1]
    ragged = distance * (1 - 0.2 * np.exp(-((xx - 60) ** 2) / (2 * 3.0**2)))
    assert median_diameter(class_map > 0) == pytest.approx(90, abs=1)
    fixed, _ = unet_outputs_to_labels(ideal_probs(class_map), ragged, smooth=2.0, smooth_per_diameter=0)
    adaptive, _ = unet_outputs_to_labels(ideal_probs(class_map), ragged, smooth=2.0, smooth_per_diameter=0.08)
    assert fixed.max() == 2 and adaptive.max() == 1
    small = np.stack([disk((40, 50), 20, 15, 7), disk((40, 50), 20, 29, 7)])
    small[1][small[0] > 0] = 0
    class_map, distance = targets_to_unet_maps(small)
    labels, _ = unet_outputs_to_labels(ideal_probs(class_map), distance, smooth=2.0, smooth_per_diameter=0.08)
    assert labels.max() == 2
    assert median_diameter(np.zeros((8, 8), bool)) == 0.0


def test_boundary_weight_splits_touching_nuclei_under_one_distance_dome():
    """Two touching disks whose predicted distance is one dome over both (as a blurry distance
    head gives): one object from the distance alone, two once the boundary class marking their
    contact line is subtracted; a lone disk stays one object."""
    shape = (64, 80)
    gt = np.stack([disk(shape, 32, 28, 10), disk(shape, 32, 46, 10)])
    gt[1][gt[0] > 0] = 0
    class_map, _ = targets_to_unet_maps(gt)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dome = np.clip(1 - ((xx - 37) / 20.0) ** 2 - ((yy - 32) / 11.0) ** 2, 0, 1) * (class_map > 0)
    merged, _ = unet_outputs_to_labels(ideal_probs(class_map), dome, boundary_weight=0.0)
    split, _ = unet_outputs_to_labels(ideal_probs(class_map), dome, boundary_weight=0.5)
    assert merged.max() == 1 and split.max() == 2
    assert min(best_ious(gt, [split == 1, split == 2])) > 0.8
    lone_map, lone_distance = targets_to_unet_maps(gt[:1])
    lone, _ = unet_outputs_to_labels(ideal_probs(lone_map), lone_distance, boundary_weight=0.5)
    assert lone.max() == 1 and iou(lone, gt[0]) > 0.95


def test_min_score_drops_uncertain_objects_and_renumbers():
    probs = np.zeros((3, 20, 30), np.float32)
    probs[0] = 1.0
    probs[:, 2:8, 2:8] = np.array([0.1, 0.9, 0.0], np.float32)[:, None, None]  # confident
    probs[:, 10:16, 10:16] = np.array([0.3, 0.7, 0.0], np.float32)[:, None, None]  # uncertain
    probs[:, 2:8, 20:26] = np.array([0.05, 0.95, 0.0], np.float32)[:, None, None]
    distance = np.zeros((20, 30), np.float32)
    labels, scores = unet_outputs_to_labels(probs, distance, fg_threshold=0.5)
    assert labels.max() == 3
    labels, scores = unet_outputs_to_labels(probs, distance, fg_threshold=0.5, min_score=0.8)
    assert labels.max() == 2 and sorted(np.unique(labels)) == [0, 1, 2]
    np.testing.assert_allclose(sorted(scores), [0.9, 0.95], rtol=1e-6)
    assert (labels[10:16, 10:16] == 0).all()
    same, kept = drop_low_scores(labels, scores, 0.0)
    assert same is labels and kept is scores


def test_120_separate_disks_are_120_instances():
    rng = np.random.default_rng(0)
    shape = (12 * 18, 10 * 18)
    gt = np.stack(
        [disk(shape, 9 + 18 * i, 9 + 18 * j, rng.uniform(3, 7)) for i in range(12) for j in range(10)]
    )
    class_map, distance = targets_to_unet_maps(gt)
    labels, scores = unet_outputs_to_labels(ideal_probs(class_map), distance)
    assert labels.max() == 120 and len(scores) == 120
    pred = labels_to_instances(labels, scores)["masks"].numpy()
    assert min(best_ious(gt, pred)) > 0.99


def test_unseeded_and_small_objects():
    probs = np.zeros((3, 20, 20), np.float32)
    probs[0] = 1
    probs[:, 2:4, 2:12] = [[[0]], [[0]], [[1]]]  # a 2-px thin object, all boundary: no seed
    probs[:, 15:17, 15:17] = [[[0]], [[1]], [[0]]]  # 4 px: below min_size
    labels, scores = unet_outputs_to_labels(probs, np.zeros((20, 20), np.float32), min_size=10)
    assert labels.max() == 1 and (labels > 0).sum() == 20 and len(scores) == 1


def test_labels_to_instances_boxes_and_order():
    labels = np.zeros((10, 12), np.int32)
    labels[1:3, 2:5] = 7
    labels[5:9, 6:12] = 3
    inst = labels_to_instances(labels, np.array([0.3, 0.7]))
    assert inst["masks"].dtype == torch.uint8 and inst["masks"].shape == (2, 10, 12)
    np.testing.assert_array_equal(inst["boxes"].numpy(), [[6, 5, 12, 9], [2, 1, 5, 3]])  # label 3 first
    assert inst["scores"].tolist() == pytest.approx([0.3, 0.7])
    assert inst["labels"].dtype == torch.int64 and inst["labels"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="3 scores for 2 objects"):
        labels_to_instances(labels, np.ones(3))
    empty = labels_to_instances(np.zeros((4, 5), np.int32))
    assert empty["masks"].shape == (0, 4, 5) and empty["boxes"].shape == (0, 4)


def test_label_image_round_trip():
    rng = np.random.default_rng(1)
    labels = np.zeros((50, 60), np.int64)
    for k, (y, x) in enumerate(rng.integers(0, 45, size=(15, 2)), start=1):
        labels[y : y + 5, x : x + 5] = k * 10  # non-consecutive ids, some overlap and hide others
    ids = np.unique(labels)[1:]
    instances = labels_to_instances(labels)
    out = masks_to_label_image(instances["masks"].numpy(), instances["scores"].numpy())
    # same partition, objects renumbered 1..K in the order of their old ids
    np.testing.assert_array_equal(out, np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0))


def test_higher_score_wins_overlap():
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[0, 0:6, 0:6] = 1
    masks[1, 3:9, 3:9] = 1
    out = masks_to_label_image(masks, np.array([0.2, 0.9]))
    assert out[4, 4] == 2 and out[0, 0] == 1 and out.max() == 2
    assert masks_to_label_image(masks, np.array([0.95, 0.9]))[4, 4] == 1


def test_object_slices_compact_sparse_ids():
    labels = np.zeros((6, 8), np.uint32)
    labels[1:3, 1:4] = 70_000  # beyond uint16
    labels[4, 6] = 5
    labels[0, 7] = labels[5, 0] = 9  # one object in two pieces
    ids, compact, slices = object_slices(labels)
    assert ids.tolist() == [5, 9, 70_000]
    assert compact[4, 6] == 1 and compact[0, 7] == compact[5, 0] == 2 and compact[1, 1] == 3
    assert slices == [(slice(4, 5), slice(6, 7)), (slice(0, 6), slice(0, 8)), (slice(1, 3), slice(1, 4))]
    assert object_slices(np.zeros((3, 3), np.int64))[0].size == 0


@pytest.mark.parametrize("seed", range(12))
def test_masked_h_maxima_equals_skimage_on_the_whole_image(seed):
    """Object by object, the h-maxima are those of the whole masked image: random smooth fields of
    many touching and separate blobs, every h of the calibration grid, and fields where no blob
    rises h above the background (then the highest one alone holds the maximum)."""
    from scipy import ndimage
    from skimage.morphology import h_maxima

    from cellrcnn.models.postprocess import masked_h_maxima

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((120, 150)), rng.uniform(1.5, 5))
    field = (field - field.min()) / (field.max() - field.min())
    threshold = rng.uniform(0.3, 0.7)
    mask = field > threshold
    dist = np.clip(field - threshold, 0, None) * rng.uniform(0.2, 3)
    for h in (0.02, 0.05, 0.1, 0.2, 0.5, 2.0):
        expected = h_maxima(np.where(mask, dist, 0).astype(np.float64), h).astype(bool) & mask
        np.testing.assert_array_equal(masked_h_maxima(dist, mask, h), expected)
