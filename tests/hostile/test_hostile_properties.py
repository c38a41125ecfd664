"""Property-based tests (hypothesis): RLE encode/decode, polygon and label-image round trips, and
COCO parsing of random garbage (only the project's own, named errors may come out)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cellrcnn.data.coco import CocoFormatError, CocoInstanceDataset, load_coco_json
from cellrcnn.data.converters.common import encode_mask
from cellrcnn.data.converters.validate import validate
from cellrcnn.data.masks import (
    MaskFormatError,
    check_segmentation,
    decode_segmentation,
    encode_rle,
    label_image_to_masks,
    masks_to_label_image,
    rle_counts,
)
from cellrcnn.io import read_label_image, write_label_image

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
masks = st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**32 - 1), st.floats(0, 1)).map(
    lambda t: (np.random.default_rng(t[2]).random((t[0], t[1])) < t[3]).astype(np.uint8))


@FAST
@given(masks)
def test_rle_round_trip(mask):
    rle = encode_rle(mask)
    assert sum(rle_counts(rle["counts"])) == mask.size
    assert np.array_equal(decode_segmentation(rle, *mask.shape), mask)
    fast = encode_mask(mask)  # the converters' encoder is pycocotools' byte for byte
    assert fast["counts"].decode("ascii") == rle["counts"]


@FAST
@given(masks, st.integers(1, 6))
def test_cut_rle_is_refused(mask, cut):
    counts = encode_rle(mask)["counts"]
    if len(counts) <= cut:
        return
    with pytest.raises(MaskFormatError):
        check_segmentation({"size": list(mask.shape), "counts": counts[:-cut]}, *mask.shape)


@FAST
@given(st.text(max_size=40))
def test_rle_counts_of_any_text_is_a_mask_or_a_named_error(text):
    try:
        runs = rle_counts(text)
    except MaskFormatError:
        return
    assert all(r >= 0 for r in runs)


@FAST
@given(st.integers(0, 20), st.integers(0, 20), st.integers(1, 10), st.integers(1, 10))
def test_rectangle_polygon_round_trip(x0, y0, w, h):
    height, width = 32, 32
    poly = [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]
    mask = decode_segmentation(poly, height, width)
    expected = np.zeros((height, width), np.uint8)
    expected[y0 : y0 + h, x0 : x0 + w] = 1
    assert np.array_equal(mask, expected)


@FAST
@given(arrays(np.uint16, st.tuples(st.integers(1, 16), st.integers(1, 16)), elements=st.integers(0, 6)))
def test_label_image_round_trips(tmp_path_factory, labels):
    masks_, ids = label_image_to_masks(labels)
    back = masks_to_label_image(masks_)
    assert np.array_equal(np.where(back > 0, ids[np.maximum(back - 1, 0)] if ids.size else 0, 0), labels)
    path = write_label_image(tmp_path_factory.mktemp("l") / "l.tif", labels)
    assert np.array_equal(read_label_image(path), labels)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "image_id", "category_id", "file_name", "height", "width", "bbox",
                         "segmentation", "size", "counts", "area", "iscrowd", "images", "annotations", "info"]),
        children, max_size=6),
    max_leaves=25)
image_entries = st.fixed_dictionaries({"id": json_values | st.integers(1, 3), "file_name": json_values | st.just("a.png"),
                                       "height": json_values | st.just(8), "width": json_values | st.just(8)})
documents = st.fixed_dictionaries({
    "images": st.lists(image_entries | json_values, max_size=3) | json_values,
    "annotations": st.lists(st.fixed_dictionaries({
        "id": st.integers(1, 5), "image_id": json_values | st.integers(1, 3), "category_id": json_values | st.just(1),
        "segmentation": json_values, "bbox": json_values, "area": json_values, "iscrowd": st.just(0)}) | json_values,
        max_size=3),
    "categories": st.just([{"id": 1, "name": "n"}]) | json_values,
    "info": st.just({"source": "s", "licence": "l"}) | json_values,
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_coco_parsing_of_garbage_raises_only_named_errors(tmp_path_factory, doc):
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "images").mkdir()
    path = root / "annotations" / "train.json"
    path.write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load_coco_json(path)
            dataset = CocoInstanceDataset(path)
            for i in range(len(dataset)):
                dataset.load_target(i)
        except CocoFormatError as exc:
            assert str(path) in str(exc)
    problems = validate(root)  # never raises: everything is a reported problem
    assert isinstance(problems, list)
