"""Predicting at the training object size: diameters, resizing, the one- and two-pass rules."""

import json

import numpy as np
import pytest
from scipy import ndimage

from cellrcnn.inference.scale import (
    annotation_diameter,
    check_diameter,
    enlarge_labels,
    object_diameters,
    predict_at_diameter,
    resize_image,
    resize_labels,
    resolve_diameter,
)


def disks(diameter: float, grid: int = 4, gap: float = 1.8) -> np.ndarray:
    """uint8 image (bright disks on 10) with grid×grid disks of ``diameter`` px."""
    step = int(diameter * gap)
    size = step * grid
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), 10, np.uint8)
    for cy in range(step // 2, size, step):
        for cx in range(step // 2, size, step):
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= (diameter / 2) ** 2] = 200
    return image


class ThresholdModel:
    """A label function (threshold + connected components) that records the image sizes it saw."""

    def __init__(self):
        self.shapes = []

    def __call__(self, raw):
        self.shapes.append(raw.shape)
        labels, n = ndimage.label(raw > 100)
        return labels.astype(np.uint32), np.linspace(0.5, 1.0, n).astype(np.float32)


def test_object_diameters_of_disks():
    labels, n = ndimage.label(disks(30) > 100)
    assert n == 16
    np.testing.assert_allclose(object_diameters(labels), 30, atol=1.0)
    assert object_diameters(np.zeros((5, 5), np.uint16)).size == 0


def test_object_diameters_counted_in_chunks_match_one_count(monkeypatch):
    """Areas are summed over pixel chunks (no int64 copy of a whole-slide label image); a chunk
    that ends inside an object, or holds no object, changes nothing."""
    import cellrcnn.data.sizes as sizes

    labels, _ = ndimage.label(disks(30) > 100)
    whole = object_diameters(labels.astype(np.uint32))
    monkeypatch.setattr(sizes, "BINCOUNT_CHUNK", 777)
    np.testing.assert_array_equal(object_diameters(labels.astype(np.uint32)), whole)
    np.testing.assert_array_equal(object_diameters(labels.astype(np.uint64)), whole)


def test_annotation_diameter_counts_masks_and_boxes(tmp_path):
    area = float(np.pi * 10**2)  # a 20 px disk
    def ann(i, **extra):
        return {"id": i, "image_id": 1, "category_id": 1, "iscrowd": 0, **extra}

    polygon = [[0, 0, 1, 1, 2, 2]]
    anns = [
        ann(1, segmentation={"size": [1, 1], "counts": "x"}, area=area, bbox=[0, 0, 20, 20]),
        ann(2, segmentation=polygon, area=area, bbox=[0, 0, 20, 20]),
        ann(3, bbox=[5, 5, 40, 10], area=400.0),  # box only: sqrt(40·10) = 20
        ann(4, segmentation=polygon, area=1e6, bbox=[0, 0, 9, 9], iscrowd=1),  # crowd: not counted
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 50, "width": 50}], "annotations": anns}))
    assert annotation_diameter(path) == pytest.approx(20.0)
    path.write_text(json.dumps({"images": [], "annotations": []}))
    assert annotation_diameter(path) is None


@pytest.mark.parametrize("shape", [(40, 60), (40, 60, 3)])
def test_resize_image_keeps_dtype_and_range(shape):
    raw = np.random.default_rng(0).integers(0, 65535, shape, dtype=np.uint16)
    small = resize_image(raw, 0.5)
    assert small.dtype == np.uint16 and small.shape == (20, 30, *shape[2:])
    big = resize_image(raw, 2.5)
    assert big.shape == (100, 150, *shape[2:])
    assert big.min() >= raw.min() and big.max() <= raw.max()  # bilinear: no overshoot
    flat = resize_image(np.full((10, 10), 7, np.uint8), 0.3)
    assert (flat == 7).all()


def test_resize_labels_inverts_an_upsampling_and_drops_lost_objects():
    labels = np.random.default_rng(1).integers(0, 6, (12, 17)).astype(np.uint16)
    scores = np.arange(1, 6, dtype=np.float32) / 10
    present = np.unique(labels)[1:]
    back, kept = resize_labels(np.kron(labels, np.ones((3, 3), np.uint16)), scores, labels.shape)
    # every object survives: same partition, renumbered in order, scores follow
    np.testing.assert_array_equal(back, np.searchsorted(present, labels) * (labels > 0) + (labels > 0))
    np.testing.assert_allclose(kept, scores[present - 1])

    tiny = np.zeros((40, 40), np.uint32)
    tiny[0:20, 0:20] = 1
    tiny[31, 33] = 2  # one pixel between the sampled rows and columns (2, 6, ..., 38): gone
    out, out_scores = resize_labels(tiny, np.array([0.9, 0.8], np.float32), (10, 10))
    assert out.max() == 1 and (out == 1).sum() == 25
    np.testing.assert_allclose(out_scores, [0.9])


def test_enlarge_labels_draws_smoother_outlines_than_nearest_neighbour():
    yy, xx = np.mgrid[:400, :400]
    truth = np.zeros((400, 400), np.int32)
    for k, (cy, cx, r) in enumerate([(100, 100, 60), (100, 215, 55), (280, 250, 80)], 1):  # 1 and 2 touch
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    small = resize_labels(truth, np.ones(3, np.float32), (100, 100))[0]  # a prediction at 1/4 size
    small[small == 2] = 5  # ids with gaps, as a tiled prediction may leave them: renumbered 1..N
    scores = np.array([0.9, 0.0, 0.7, 0.0, 0.8], np.float32)

    smooth, kept = enlarge_labels(small, scores, (400, 400))
    steps, _ = resize_labels(small, scores, (400, 400))

    def iou(labels, k):
        return ((labels == k) & (truth == k)).sum() / ((labels == k) | (truth == k)).sum()

    assert smooth.max() == 3 and kept.tolist() == pytest.approx([0.9, 0.7, 0.8])
    truth = np.array([0, 1, 3, 2])[truth]  # the truth's ids as the renumbered ones: 1, 5->3, 3->2
    for k in (1, 2, 3):
        assert iou(smooth, k) > iou(steps, k) and iou(smooth, k) > 0.96


def test_given_diameter_resizes_once_and_returns_full_size_labels():
    image = disks(60)
    model = ThresholdModel()
    native, _ = ThresholdModel()(image)
    labels, scores, info = predict_at_diameter(image, model, 60, model_diameter=20)
    assert info == {"factor": pytest.approx(1 / 3, abs=1e-3)}
    assert model.shapes == [(image.shape[0] // 3, image.shape[1] // 3)]
    assert labels.shape == image.shape and labels.max() == 16 == len(scores)
    for k in range(1, 17):  # each object matches the native-resolution one (IoU > 0.9)
        j = np.bincount(native[labels == k]).argmax()
        inter = ((labels == k) & (native == j)).sum()
        assert inter / ((labels == k) | (native == j)).sum() > 0.9


def test_auto_measures_first_and_rescales_only_when_needed():
    model = ThresholdModel()
    labels, _, info = predict_at_diameter(disks(60), model, "auto", model_diameter=20)
    assert info["measured_diameter"] == pytest.approx(60, abs=1.5)
    assert info["factor"] == pytest.approx(1 / 3, abs=0.02)
    assert len(model.shapes) == 2 and model.shapes[1][0] == pytest.approx(model.shapes[0][0] / 3, abs=1)
    assert labels.max() == 16

    model = ThresholdModel()  # objects 4x too small: auto enlarges at most 2x (noise looks small too)
    _, _, info = predict_at_diameter(disks(10), model, "auto", model_diameter=40)
    assert info["factor"] == 2.0 and model.shapes[1] == tuple(2 * n for n in model.shapes[0])

    model = ThresholdModel()  # objects already near the training size: one pass, untouched
    _, _, info = predict_at_diameter(disks(22), model, "auto", model_diameter=20)
    assert info["factor"] == 1.0 and len(model.shapes) == 1

    model = ThresholdModel()  # too few objects to measure: the native result stands
    _, _, info = predict_at_diameter(disks(60, grid=2), model, "auto", model_diameter=20)
    assert info == {"factor": 1.0, "measured_diameter": None} and len(model.shapes) == 1


def test_auto_measures_with_one_quick_view_at_native_size():
    """With a quick predictor, auto measures on it (native size: small objects stay visible) and
    the full predictor runs once, at the size chosen."""
    model, quick = ThresholdModel(), ThresholdModel()
    image = disks(10)
    labels, _, info = predict_at_diameter(image, model, "auto", model_diameter=20, probe_fn=quick)
    assert quick.shapes == [image.shape] and info["measured_diameter"] == pytest.approx(10, abs=1)
    assert info["factor"] == pytest.approx(2.0, abs=0.05) and len(model.shapes) == 1
    assert model.shapes[0][0] == pytest.approx(image.shape[0] * info["factor"], abs=1)
    assert labels.shape == image.shape and labels.max() == 16

    model, quick = ThresholdModel(), ThresholdModel()  # the training size already: one full pass, native
    _, _, info = predict_at_diameter(disks(22), model, "auto", model_diameter=20, probe_fn=quick)
    assert info["factor"] == 1.0 and len(quick.shapes) == 1 and model.shapes == [disks(22).shape]


def test_shrink_measures_at_half_size_and_only_shrinks_objects_beyond_the_training_range():
    profile = {"object_diameter_px": {"p5": 8.0, "p50": 19.0, "p95": 36.0, "p99": 50.0}}
    model, quick = ThresholdModel(), ThresholdModel()
    image = disks(72)  # 516 px: objects beyond the training 99th percentile
    labels, _, info = predict_at_diameter(image, model, "shrink", model_diameter=19, probe_fn=quick, profile=profile)
    assert quick.shapes == [(258, 258)]  # the measuring pass: the quick predictor, half size
    assert info["measured_diameter"] == pytest.approx(72, abs=2)
    assert info["factor"] == pytest.approx(0.5, abs=0.02)  # to the 95th percentile, 36 px
    assert model.shapes == [(258, 258)] and labels.shape == image.shape and labels.max() == 16

    for diameter in (45, 10):  # within the training range, or smaller: native, never enlarged
        model, quick = ThresholdModel(), ThresholdModel()
        image = disks(diameter, grid=8)
        labels, _, info = predict_at_diameter(image, model, "shrink", 19, probe_fn=quick, profile=profile)
        assert info["factor"] == 1.0 and model.shapes == [image.shape] and len(quick.shapes) == 1
        assert labels.max() == 64

    model = ThresholdModel()  # no profile: 2.8x the median is the limit, 2x the target
    _, _, info = predict_at_diameter(disks(80), model, "shrink", model_diameter=20)
    assert info["factor"] == pytest.approx(0.5, abs=0.02) and len(model.shapes) == 2

    model = ThresholdModel()  # smaller than PROBE_MIN_SIDE: no measuring pass
    _, _, info = predict_at_diameter(disks(20, grid=2), model, "shrink", model_diameter=20)
    assert info == {"factor": 1.0, "measured_diameter": None} and model.shapes == [(72, 72)]

    model = ThresholdModel()  # a checkpoint without its training size: native, no error
    _, _, info = predict_at_diameter(disks(60), model, "shrink", model_diameter=None)
    assert info == {"factor": 1.0} and len(model.shapes) == 1


def test_range_enlarges_as_auto_and_shrinks_only_as_shrink():
    """range shrinks only objects beyond the training range, to its 95th percentile, as shrink does
    (measured at half size), and enlarges objects much smaller than the training median as auto
    does (measured again at native size, where small objects stay visible); objects between are
    predicted at native size."""
    profile = {"object_diameter_px": {"p5": 8.0, "p50": 19.0, "p95": 36.0, "p99": 50.0}}
    expected = {10: 1.9, 30: 1.0, 45: 1.0, 72: 0.5}  # auto would give 1.9, 0.63, 0.42, 0.26
    for diameter, factor in expected.items():
        model, quick = ThresholdModel(), ThresholdModel()
        image = disks(diameter, grid=8 if diameter < 60 else 4)
        labels, _, info = predict_at_diameter(image, model, "range", 19, probe_fn=quick, profile=profile)
        half = tuple(round(n / 2) for n in image.shape)
        # shrink's half-size pass first; a second one at native size only where objects may be small
        assert quick.shapes == ([half, image.shape] if diameter < 19 else [half])
        assert info["measured_diameter"] == pytest.approx(diameter, abs=2)
        assert info["factor"] == pytest.approx(factor, abs=0.05), diameter
        assert len(model.shapes) == 1 and labels.shape == image.shape and labels.max() == (8 if diameter < 60 else 4) ** 2
        if factor != 1.0:
            assert model.shapes[0][0] == pytest.approx(image.shape[0] * info["factor"], abs=1)
    # objects the model splits at native size read small there: the half-size pass keeps them whole
    def splitting(raw):
        labels, n = ndimage.label(raw > 100)
        if max(raw.shape) > 300:  # at native size every disk is cut in two
            labels = labels * 2 - (np.indices(raw.shape)[1] % 2 == 0) * (labels > 0)
        return labels.astype(np.uint32), np.ones(int(labels.max()), np.float32)
    image = disks(40, grid=6)  # 432 px: 40-px disks, whole at half size (216 px)
    _, _, info = predict_at_diameter(image, splitting, "range", 19, profile=profile)
    assert info["factor"] == 1.0 and info["measured_diameter"] == pytest.approx(40, abs=2)
    with pytest.raises(ValueError, match="object_diameter"):
        check_diameter("range", None, "my.ckpt")


def test_shrink_measures_a_large_image_on_its_central_window(monkeypatch):
    import cellrcnn.inference.scale as scale

    monkeypatch.setattr(scale, "PROBE_WINDOW", 200)
    model, quick = ThresholdModel(), ThresholdModel()
    _, _, info = predict_at_diameter(disks(60), model, "shrink", model_diameter=10, probe_fn=quick)
    assert quick.shapes == [(100, 100)]  # 200 of 432 px, at half size
    # the window holds few whole disks: too few to measure, so native size
    assert info["factor"] == 1.0 and model.shapes == [(432, 432)]


def test_native_by_default_and_clear_errors():
    model = ThresholdModel()
    image = disks(30)
    labels, _, info = predict_at_diameter(image, model, None, model_diameter=None)
    assert info == {"factor": 1.0} and model.shapes == [image.shape] and labels.max() == 16
    with pytest.raises(ValueError, match="my.ckpt.*object_diameter"):
        check_diameter("auto", None, "my.ckpt")
    for bad in ("large", -3, 0):
        with pytest.raises(ValueError, match="positive number of pixels"):
            check_diameter(bad, 20.0)


def test_enlargement_is_capped_for_huge_images(monkeypatch):
    import cellrcnn.inference.scale as scale

    monkeypatch.setattr(scale, "MAX_RESIZED_PIXELS", 4 * 120 * 120)  # at most 2x for this image
    model = ThresholdModel()
    with pytest.warns(UserWarning, match="enlarged 2.00× only"):
        labels, _, info = predict_at_diameter(disks(15, gap=2), model, 5, model_diameter=20)
    assert info["factor"] == pytest.approx(2.0) and model.shapes == [(240, 240)]
    assert labels.shape == (120, 120) and labels.max() == 16


def test_auto_on_an_image_too_large_to_enlarge_keeps_its_first_pass(monkeypatch):
    """A whole-slide field that may not grow at all is not predicted a second time at 1x."""
    import cellrcnn.inference.scale as scale

    image = disks(10, gap=2.5)
    monkeypatch.setattr(scale, "MAX_RESIZED_PIXELS", image.size)
    model = ThresholdModel()
    with pytest.warns(UserWarning, match="enlarged 1.00× only"):
        labels, _, info = predict_at_diameter(image, model, "auto", model_diameter=20)
    assert info["factor"] == 1.0 and info["measured_diameter"] == pytest.approx(10, abs=1)
    assert model.shapes == [image.shape] and labels.max() == 16


def test_default_diameter_is_the_models_recommendation():
    assert resolve_diameter("default", None) == "shrink"  # a checkpoint that recommends nothing
    assert resolve_diameter("default", "auto") == "auto"
    assert resolve_diameter("default", "range") == "range"
    for explicit in ("shrink", "auto", "range", None, 30):  # what the user says wins
        assert resolve_diameter(explicit, "auto") == explicit
    assert resolve_diameter("native", "auto") is None  # null's other name (forms, commands)
    check_diameter("default", None)  # resolved per model later; valid for any checkpoint
    model = ThresholdModel()  # without a model's word, default is shrink, native is null
    assert predict_at_diameter(disks(20), model, "native", model_diameter=20)[2] == {"factor": 1.0}
