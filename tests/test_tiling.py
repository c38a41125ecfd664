"""Tiled prediction: tiled and whole-image results agree, seams included; memory follows the tile."""

from __future__ import annotations

import itertools
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.draw import disk

from cellrcnn.inference.tiling import (
    estimate_percentiles,
    owned_ranges,
    predict_fn_from_label_fn,
    predict_tiled,
    tile_starts,
)

SIZE, TILE, OVERLAP = 1500, 512, 96


def threshold_labels(image: np.ndarray) -> np.ndarray:
    """Deterministic classical segmenter: fixed threshold + 4-connected components."""
    return ndimage.label(np.asarray(image).mean(axis=0) > 0.5)[0]


def seam_positions(length: int) -> list[float]:
    """Tile edges and overlap midpoints along one axis: where merging can go wrong."""
    starts = tile_starts(length, TILE, OVERLAP)
    edges = {s for s in starts[1:]} | {s + TILE for s in starts[:-1]}
    mids = {lo for lo, _ in owned_ranges(starts, TILE, length)[1:]}
    return sorted(edges | mids)


def disk_image(seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, int]:
    """float32 1×H×W image of non-touching disks (radius 6-20 px, diameter < overlap) inside the
    image; disks are centred on every seam line and seam crossing, plus random ones.
    Returns (image, n_seam)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    taken = np.zeros((size, size), bool)

    def place(cy: float, cx: float, r: float) -> bool:
        if min(cy, cx) < r + 2 or max(cy, cx) > size - r - 2:
            return False
        rr, cc = disk((cy, cx), r + 3, shape=img.shape)  # 3 px gap: components never merge
        if taken[rr, cc].any():
            return False
        taken[rr, cc] = True
        rr, cc = disk((cy, cx), r, shape=img.shape)
        img[rr, cc] = 1.0
        return True

    seams = seam_positions(size)
    n_seam = 0
    for s in seams:  # centred exactly on a seam line, at several places along it
        for t in np.linspace(30, size - 30, 9):
            n_seam += place(t, s, rng.uniform(6, 20)) + place(s, t + 40, rng.uniform(6, 20))
    for sy, sx in itertools.product(seams, seams):  # on seam crossings (corners of 4 tiles)
        n_seam += place(sy, sx, rng.uniform(6, 20))
    for _ in range(3000):
        place(*rng.uniform(0, size, 2), rng.uniform(6, 20))
    return img[None], n_seam


def match_iou(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, int]:
    """Best IoU of each reference object with a predicted one, and the number of predicted objects."""
    n_ref, n_pred = int(ref.max()), int(pred.max())
    pairs = ref.astype(np.int64) * (n_pred + 1) + pred
    inter = np.bincount(pairs.ravel(), minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)
    area_r, area_p = inter.sum(1), inter.sum(0)
    iou = inter / np.maximum(area_r[:, None] + area_p[None, :] - inter, 1)
    return iou[1:, 1:].max(axis=1, initial=0), n_pred


def test_tile_grid_overlaps_and_owned_ranges_partition():
    for length in (100, 512, 513, 1500, 4096):
        starts = tile_starts(length, TILE, OVERLAP)
        assert starts[0] == 0 and starts[-1] == max(0, length - TILE)
        assert all(a + TILE - b >= OVERLAP for a, b in zip(starts[:-1], starts[1:], strict=True))
        owned = owned_ranges(starts, TILE, length)
        assert owned[0][0] == 0 and owned[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(owned[:-1], owned[1:], strict=True))
        for s, (lo, hi) in zip(starts, owned, strict=True):  # owned part lies overlap/2 inside the tile
            assert (lo == 0 or lo - s >= OVERLAP / 2) and (hi == length or s + TILE - hi >= OVERLAP / 2)


def test_tiled_equals_untiled_including_seam_objects():
    image, n_seam = disk_image()
    ref = threshold_labels(image)
    assert n_seam > 50 and ref.max() > 600
    labels, scores = predict_tiled(image, predict_fn_from_label_fn(threshold_labels), TILE, OVERLAP, progress=False)
    assert labels.dtype == np.uint32 and labels.shape == ref.shape
    best, n_pred = match_iou(ref, labels)
    assert n_pred == ref.max()  # nothing duplicated, nothing lost
    assert (best >= 0.9).mean() >= 0.99
    assert np.array_equal(labels > 0, ref > 0)  # in fact identical for a deterministic segmenter
    assert np.array_equal(np.unique(labels), np.arange(n_pred + 1))  # labels 1..N without gaps
    assert len(scores) == n_pred and np.all(scores == 1.0)


def test_model_whose_masks_shift_between_tiles_is_deduplicated():
    """A real model's masks of one cell differ between two tiles; the cell must still come out once.

    Every other tile shifts its masks one pixel to the right, so the box centre of a seam object
    differs between the two tiles; scores tell the versions apart.
    """
    image, _ = disk_image(seed=1)
    ref = threshold_labels(image)
    base = predict_fn_from_label_fn(threshold_labels)
    calls = itertools.count()

    def shifty(images: list[torch.Tensor]) -> list[dict]:
        out = base(images)
        for pred in out:
            odd = next(calls) % 2
            masks = pred["masks"].numpy()
            if odd:
                masks = np.roll(masks, 1, axis=2)
                masks[:, :, 0] = 0
            pred["masks"] = torch.from_numpy(masks)
            pred["scores"] = torch.full((len(masks),), 0.6 if odd else 0.9)
        return out

    labels, scores = predict_tiled(image, shifty, TILE, OVERLAP, progress=False)
    best, n_pred = match_iou(ref, labels)
    assert n_pred == ref.max()
    assert (best >= 0.75).mean() >= 0.99  # a 1-px shift of a 6-px disk has IoU 0.81
    np.testing.assert_allclose(np.unique(scores), [0.6, 0.9])  # both kinds of tile contributed


def test_scores_follow_their_objects():
    image, _ = disk_image(seed=2)

    def area_scored(images):
        out = predict_fn_from_label_fn(threshold_labels)(images)
        for pred in out:
            masks = pred["masks"].numpy()
            pred["scores"] = torch.from_numpy(masks.reshape(len(masks), -1).sum(1) / 1000.0)
        return out

    labels, scores = predict_tiled(image, area_scored, TILE, OVERLAP, progress=False)
    areas = np.bincount(labels.ravel())[1:]
    np.testing.assert_allclose(scores, areas / 1000.0, rtol=1e-6)


def test_raw_uint16_is_normalised_once_for_the_whole_image():
    image, _ = disk_image(seed=3, size=900)
    raw = (1000 + image * 30000).astype(np.uint16)
    raw[0, :300, :300] += 50  # uneven background must not shift per-tile normalisation
    lo, hi = estimate_percentiles(raw, max_samples=10_000)
    exact = np.percentile(raw, [1, 99.8])
    assert abs(lo - exact[0]) < 60 and abs(hi - exact[1]) < 60
    got, _ = predict_tiled(raw, predict_fn_from_label_fn(threshold_labels), 256, 64, progress=False)
    want, _ = predict_tiled(image, predict_fn_from_label_fn(threshold_labels), 256, 64, progress=False)
    assert np.array_equal(got, want)


def test_channels_are_converted_per_tile_and_small_images_run_as_one_tile():
    image, _ = disk_image(seed=4, size=300)
    seen = []

    def fn(images):
        seen.extend(tuple(t.shape) for t in images)
        return predict_fn_from_label_fn(threshold_labels)(images)

    labels, _ = predict_tiled(image, fn, 512, 64, progress=False, channels=3)
    assert seen == [(3, 300, 300)]
    assert labels.max() == threshold_labels(image).max()


def test_peak_memory_grows_with_tile_not_image():
    size, tile = 2048, 256
    image, _ = disk_image(seed=5, size=size)
    fn = predict_fn_from_label_fn(threshold_labels)
    tracemalloc.start()
    labels, _ = predict_tiled(image, fn, tile, 48, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = int(labels.max())
    assert n > 1000
    # the uint32 label image (16.8 MB) plus per-tile work; N full-size masks would be n × 4.2 MB
    assert peak < 2 * size * size * 4, peak / 1e6


def test_objects_larger_than_the_overlap_warn_and_bad_overlap_raises():
    img = np.zeros((1, 600, 600), np.float32)
    rr, cc = disk((300, 300), 90)
    img[0, rr, cc] = 1
    with pytest.warns(UserWarning, match="larger than the overlap"):
        predict_tiled(img, predict_fn_from_label_fn(threshold_labels), 256, 32, progress=False)
    with pytest.raises(ValueError, match="overlap"):
        predict_tiled(img, predict_fn_from_label_fn(threshold_labels), 256, 256, progress=False)


def test_predict_image_tiles_large_raw_images_only():
    from cellrcnn.inference.tiling import predict_image
    from cellrcnn.io import prepare_image

    image, _ = disk_image(seed=6, size=700)
    raw = (500 + image[0] * 20000).astype(np.uint16)  # H×W as read_image returns it
    calls = []

    def fn(images):
        calls.append(tuple(images[0].shape))
        return predict_fn_from_label_fn(threshold_labels)(images)

    small, _ = predict_image(raw, fn, channels=3, tile_size=1024, progress=False)
    assert calls == [(3, 700, 700)]  # one call on exactly the evaluation preprocessing
    assert np.array_equal(small > 0, threshold_labels(prepare_image(raw, 3)) > 0)
    calls.clear()
    tiled, _ = predict_image(raw.astype(np.float32), fn, channels=1, tile_size=256, overlap=64, progress=False)
    assert len(calls) == 16 and calls[0] == (1, 256, 256)  # starts 0, 192, 384, 444 per axis
    best, n_pred = match_iou(threshold_labels(image), tiled)
    assert n_pred == best.size and (best >= 0.9).all()


def test_invert_bright_is_decided_on_the_whole_image_in_both_paths():
    """Dark disks on a bright field (brightfield-like, 16-bit): with ``invert_bright`` a
    bright-object segmenter finds every disk, tiled or not, although a tile may be mostly disk;
    without it the background is the object."""
    from cellrcnn.inference.tiling import predict_image

    image, _ = disk_image(seed=7, size=700)
    raw = (30000 - image[0] * 20000).astype(np.uint16)
    fn = predict_fn_from_label_fn(threshold_labels)
    for tile_size in (1024, 256):  # one tile (prepare_image), 4×4 tiles (predict_tiled)
        labels, _ = predict_image(raw, fn, channels=1, tile_size=tile_size, overlap=64, progress=False,
                                  invert_bright=True)
        best, n_pred = match_iou(threshold_labels(image), labels)
        assert n_pred == best.size and (best >= 0.9).all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the background, taken for an object, crosses tiles
            plain, _ = predict_image(raw, fn, channels=1, tile_size=tile_size, overlap=64, progress=False)
        assert match_iou(threshold_labels(image), plain)[0].max() < 0.5  # no disk found
    dark = (2000 + image[0] * 20000).astype(np.uint16)  # fluorescence-like: never inverted
    labels, _ = predict_image(dark, fn, channels=1, tile_size=256, overlap=64, progress=False, invert_bright=True)
    assert np.array_equal(labels > 0, threshold_labels(image) > 0)


def test_hematoxylin_input_is_the_same_in_both_paths():
    """H&E-like disks (hematoxylin) on eosin-stained stroma: with ``hematoxylin`` a bright-object
    segmenter finds every disk, whether the image is one tile (prepare_image) or 4×4 tiles (one
    whole-image deconvolution, normalised per tile with whole-image percentiles)."""
    from cellrcnn.inference.tiling import predict_image
    from cellrcnn.io import _RGB_FROM_HED

    image, _ = disk_image(seed=3, size=700)
    density = image[0][..., None] * 0.9 * _RGB_FROM_HED[0] + 0.4 * _RGB_FROM_HED[1]
    stained = np.round(255 * np.exp(-density)).astype(np.uint8)
    fn = predict_fn_from_label_fn(threshold_labels)
    for tile_size in (1024, 256):
        labels, _ = predict_image(stained, fn, channels=1, tile_size=tile_size, overlap=64, progress=False,
                                  hematoxylin=True)  # no inversion: the stain density is bright where nuclei are
        best, n_pred = match_iou(threshold_labels(image), labels)
        assert n_pred == best.size and (best >= 0.9).all()


def test_overlapping_masks_resolved_by_score_and_hidden_objects_dropped():
    """Mask R-CNN masks of one image may overlap: the higher score takes the shared pixels, an
    object hidden completely disappears, and labels stay 1..N with their scores."""
    h = w = 64

    def fn(images):
        masks = np.zeros((3, h, w), np.uint8)
        masks[0, 10:40, 10:40] = 1  # big, score 0.9
        masks[1, 20:30, 20:30] = 1  # inside the big one, lower score: hidden
        masks[2, 35:50, 35:50] = 1  # overlaps the big one's corner, higher score: wins the corner
        return [{"masks": torch.from_numpy(masks), "scores": torch.tensor([0.9, 0.5, 0.95])}]

    labels, scores = predict_tiled(np.zeros((1, h, w), np.float32), fn, 256, 32, progress=False)
    np.testing.assert_allclose(scores, [0.9, 0.95])
    assert (labels == 1).sum() == 30 * 30 - 5 * 5 and (labels == 2).sum() == 15 * 15
    assert labels[37, 37] == 2 and labels[25, 25] == 1


@pytest.mark.slow
def test_benchmark_script_smoke(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "tiled_predict.py"
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(script), "--size", "600", "--tiles", "256", "--overlap", "64",
                    "--threads", "1", "--json", str(out)], check=True, capture_output=True, timeout=600)
    (row,) = json.loads(out.read_text())
    assert row["tile"] == 256 and row["wall_s"] > 0 and row["peak_rss_mb"] >= row["baseline_rss_mb"]
    assert abs(row["n_objects"] - row["n_nuclei_drawn"]) <= 0.1 * row["n_nuclei_drawn"]  # a real segmentation
