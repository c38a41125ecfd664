"""Mask encodings: COCO RLE (compressed/uncompressed), polygons, Kaggle RLE strings, label images."""

from __future__ import annotations

import numpy as np
import pytest

from cellrcnn.data.masks import (
    MaskFormatError,
    decode_rle_string,
    decode_segmentation,
    encode_rle,
    encode_rle_string,
    label_image_to_masks,
    mask_to_bbox,
    masks_to_boxes_xyxy,
    masks_to_label_image,
)


def _labels() -> np.ndarray:
    labels = np.zeros((23, 31), np.int64)  # non-square on purpose: catches row/column-major mix-ups
    labels[2:6, 3:9] = 4
    labels[10:20, 1:4] = 9
    labels[15:22, 20:30] = 2
    labels[0, 30] = 7  # one pixel in a corner
    labels[21, 0] = 7  # same label, disconnected: stays one instance
    return labels


def test_label_image_rle_round_trip_is_pixel_identical():
    labels = _labels()
    masks, ids = label_image_to_masks(labels)
    assert ids.tolist() == [2, 4, 7, 9] and masks.shape == (4, 23, 31) and masks.dtype == np.uint8
    rles = [encode_rle(m) for m in masks]
    assert all(isinstance(r["counts"], str) and r["size"] == [23, 31] for r in rles)
    decoded = np.stack([decode_segmentation(r, 23, 31) for r in rles])
    back = masks_to_label_image(decoded)
    assert np.array_equal(ids[back - 1] * (back > 0), labels)


def test_empty_label_image():
    masks, ids = label_image_to_masks(np.zeros((5, 6), np.uint16))
    assert masks.shape == (0, 5, 6) and ids.size == 0
    assert masks_to_label_image(masks).shape == (5, 6)


def test_polygons_known_area_and_box():
    square = [2, 2, 6, 2, 6, 6, 2, 6]  # corners at pixel edges 2..6: 4×4 pixels
    m = decode_segmentation([square], 10, 12)
    assert m.dtype == np.uint8 and m.sum() == 16 and mask_to_bbox(m) == [2.0, 2.0, 4.0, 4.0]
    two = decode_segmentation([square, [8, 7, 10, 7, 10, 9, 8, 9]], 10, 12)
    assert two.sum() == 20 and mask_to_bbox(two) == [2.0, 2.0, 8.0, 7.0]
    assert decode_segmentation([], 4, 5).shape == (4, 5)


def test_uncompressed_rle_known_answer():
    # column-major runs over a 3×4 image: 4 zeros, 2 ones, 3 zeros, 1 one, 2 zeros
    m = decode_segmentation({"size": [3, 4], "counts": [4, 2, 3, 1, 2]}, 3, 4)
    expected = np.zeros((3, 4), np.uint8)
    expected[1:3, 1] = 1
    expected[0, 3] = 1
    assert np.array_equal(m, expected)
    assert np.array_equal(decode_segmentation(encode_rle(expected), 3, 4), expected)


def test_kaggle_rle_column_vs_row_major_on_non_square_mask():
    h, w = 3, 5
    f = decode_rle_string("1 2 7 3", h, w, order="F")  # column-major: down the columns first
    expected_f = np.zeros((h, w), np.uint8)
    expected_f[0:2, 0] = 1
    expected_f[0:3, 2] = 1
    assert np.array_equal(f, expected_f)
    c = decode_rle_string("1 2 7 3", h, w, order="C")  # row-major: along the rows first
    expected_c = np.zeros((h, w), np.uint8)
    expected_c[0, 0:2] = 1
    expected_c[1, 1:4] = 1
    assert np.array_equal(c, expected_c)
    rng = np.random.default_rng(1)
    mask = (rng.random((h, w)) > 0.5).astype(np.uint8)
    for order in ("F", "C"):
        assert np.array_equal(decode_rle_string(encode_rle_string(mask, order), h, w, order), mask)
    assert encode_rle_string(expected_f, "F") == "1 2 7 3"


@pytest.mark.parametrize(
    "rle",
    ["1 2 3", "1 x", "0 2", "14 3", "1 0", "1 -2"],
    ids=["odd", "non-integer", "zero start", "past the end", "zero length", "negative length"],
)
def test_bad_kaggle_rle_raises(rle):
    with pytest.raises(MaskFormatError):
        decode_rle_string(rle, 3, 5)


def test_bad_coco_segmentations_raise():
    with pytest.raises(MaskFormatError, match="size"):
        decode_segmentation({"size": [4, 4], "counts": "4"}, 3, 4)
    with pytest.raises(MaskFormatError, match="covers"):
        decode_segmentation({"size": [3, 4], "counts": [4, 2]}, 3, 4)
    with pytest.raises(MaskFormatError, match="polygon"):
        decode_segmentation([[1, 1, 2, 2]], 5, 5)
    with pytest.raises(MaskFormatError, match="unknown"):
        decode_segmentation("1 2", 5, 5)


def test_boxes_are_tight_and_exclusive():
    masks = np.zeros((3, 6, 7), np.uint8)
    masks[0, 2, 3] = 1  # one pixel: width 1
    masks[1, 1:4, 0:7] = 1
    boxes = masks_to_boxes_xyxy(masks)
    assert boxes.dtype == np.float32
    assert boxes.tolist() == [[3, 2, 4, 3], [0, 1, 7, 4], [0, 0, 0, 0]]


def test_label_image_overlap_order():
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, :2] = 1
    masks[1, 1:3] = 1
    assert masks_to_label_image(masks)[1, 0] == 2  # later wins without scores
    assert masks_to_label_image(masks, scores=np.array([0.9, 0.1]))[1, 0] == 1
    with pytest.raises(ValueError):
        masks_to_label_image(masks[0])
