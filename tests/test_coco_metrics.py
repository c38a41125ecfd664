"""COCO AP with cell-sized limits: known values by construction, and agreement with stock pycocotools."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from cellrcnn.evaluation.coco_metrics import (
    CocoImage,
    FastCOCOeval,
    _build,
    evaluate_coco,
    label_image_to_rles,
    masks_to_rles,
)


def grid_labels(n: int, step: int = 10, side: int = 6) -> np.ndarray:
    cols = int(np.ceil(np.sqrt(n)))
    lab = np.zeros((cols * step, cols * step), np.int64)
    for k in range(n):
        y, x = divmod(k, cols)
        lab[y * step + 2 : y * step + 2 + side, x * step + 2 : x * step + 2 + side] = k + 1
    return lab


def image_from_labels(gt: np.ndarray, pred: np.ndarray, scores=None) -> CocoImage:
    g_rles, g_ids, g_boxes = label_image_to_rles(gt)
    p_rles, p_ids, p_boxes = label_image_to_rles(pred)
    scores = np.ones(len(p_ids)) if scores is None else np.asarray(scores, float)
    one = np.ones
    return CocoImage(
        *gt.shape, g_boxes, one(len(g_ids), int), g_rles, p_boxes, one(len(p_ids), int), scores, p_rles
    )


def test_label_image_to_rles_roundtrip():
    lab = grid_labels(30) * 3
    rles, ids, boxes = label_image_to_rles(lab, chunk=7)
    assert ids.tolist() == [3 * k for k in range(1, 31)]
    for rle, i, box in zip(rles, ids, boxes, strict=True):
        np.testing.assert_array_equal(mask_utils.decode(rle), (lab == i).astype(np.uint8))
        np.testing.assert_allclose(box, mask_utils.toBbox(rle))
    masks = np.stack([lab == i for i in ids[:5]])
    assert [r["counts"] for r in masks_to_rles(masks, chunk=2)] == [r["counts"] for r in rles[:5]]


def test_perfect_predictions_ap_one():
    gt = grid_labels(20)
    res = evaluate_coco([image_from_labels(gt, gt, np.linspace(1, 0.1, 20))], "segm")
    assert res["segm_AP"] == res["segm_AP50"] == res["segm_AP75"] == 1.0
    assert res["segm_AP_small"] == 1.0 and np.isnan(res["segm_AP_medium"]) and np.isnan(res["segm_AP_large"])
    assert evaluate_coco([image_from_labels(gt, gt)], "bbox")["bbox_AP"] == 1.0


def test_missing_half_the_objects():
    gt = grid_labels(10)
    pred = np.where(gt <= 5, gt, 0)
    # precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points
    res = evaluate_coco([image_from_labels(gt, pred)], "segm")
    assert res["segm_AP"] == pytest.approx(51 / 101)
    assert evaluate_coco([image_from_labels(gt, pred)], "bbox")["bbox_AP50"] == pytest.approx(51 / 101)


def test_false_positive_ranking():
    gt = grid_labels(11)
    gt10 = np.where(gt <= 10, gt, 0)  # object 11 exists only in the prediction
    low = image_from_labels(gt10, gt, [1.0] * 10 + [0.1])
    assert evaluate_coco([low], "segm")["segm_AP"] == pytest.approx(1.0)
    high = image_from_labels(gt10, gt, [0.5] * 10 + [0.9])  # FP ranked first: precision k/(k+1) <= 10/11
    assert evaluate_coco([high], "segm")["segm_AP"] == pytest.approx(10 / 11)


def test_1500_objects_need_max_dets_above_1000():
    gt = grid_labels(1500)
    scores = np.linspace(1.0, 0.5, 1500)
    im = image_from_labels(gt, gt, scores)
    res = evaluate_coco([im], "segm")
    assert res["segm_AP"] == 1.0
    # the stock limit of 100 keeps recall at 100/1500 -> 7 of 101 recall points
    with pytest.warns(UserWarning, match="more than 100 detections"):
        stock = evaluate_coco([im], "segm", max_dets=(1, 10, 100))
    assert stock["segm_AP"] == pytest.approx(7 / 101)


def test_empty_cases():
    gt = grid_labels(4)
    empty = np.zeros_like(gt)
    res = evaluate_coco([image_from_labels(gt, empty)], "segm")
    assert res["segm_AP"] == 0.0 and res["segm_AP50"] == 0.0
    assert np.isnan(evaluate_coco([image_from_labels(empty, gt)], "segm")["segm_AP"])
    assert np.isnan(evaluate_coco([image_from_labels(empty, empty)], "bbox")["bbox_AP"])
    assert np.isnan(evaluate_coco([], "segm")["segm_AP"])
    # one image without GT among others: its detections are false positives with the lowest scores
    mixed = [image_from_labels(gt, gt, [0.9] * 4), image_from_labels(empty, gt, [0.1] * 4)]
    assert evaluate_coco(mixed, "segm")["segm_AP"] == pytest.approx(1.0)


def test_box_only_gt():
    gt = grid_labels(6)
    im = image_from_labels(gt, gt)
    im.gt_rles = [None] * 6  # every GT box-only
    assert evaluate_coco([im], "bbox")["bbox_AP"] == 1.0
    assert np.isnan(evaluate_coco([im], "segm")["segm_AP"])
    im.gt_rles = image_from_labels(gt, gt).gt_rles[:4] + [None, None]
    # detections on the two box-only objects fall in ignore regions: no false positives
    assert evaluate_coco([im], "segm")["segm_AP"] == 1.0
    im.dt_rles = None  # a box-only model
    assert evaluate_coco([im], "segm")["segm_AP"] == 0.0
    assert evaluate_coco([im], "bbox")["bbox_AP"] == 1.0


def test_bad_iou_type():
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_coco([], "keypoints")


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_fast_evaluate_img_equals_pycocotools(iou_type):
    """Random overlapping detections with ties, a crowd region and several sizes: FastCOCOeval gives
    the same per-image records and precision array as the stock COCOeval."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(3):
        h, w = 96, 96
        gm, dm = [], []
        for _ in range(25):
            y, x, s = rng.integers(0, 80), rng.integers(0, 80), rng.integers(3, 30)
            m = np.zeros((h, w), np.uint8)
            m[y : y + s, x : x + s] = 1
            gm.append(m)
            for _ in range(rng.integers(0, 3)):
                d = np.roll(m, rng.integers(-3, 4, size=2), axis=(0, 1))
                dm.append(d)
        for _ in range(5):  # pure false positives
            d = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, 90, size=2)
            d[y : y + 5, x : x + 5] = 1
            dm.append(d)
        gm, dm = np.stack(gm), np.stack(dm)
        g_rles, d_rles = masks_to_rles(gm), masks_to_rles(dm)
        g_box = np.array([mask_utils.toBbox(r) for r in g_rles])
        d_box = np.array([mask_utils.toBbox(r) for r in d_rles])
        scores = np.round(rng.random(len(dm)), 1)  # ties on purpose
        g_rles[0] = None  # one box-only (segm: crowd) object
        images.append(
            CocoImage(
                h, w, g_box, np.ones(len(gm), int), g_rles, d_box, np.ones(len(dm), int), scores, d_rles
            )
        )
    coco_gt, coco_dt, cats, _ = _build(images, iou_type)
    results = []
    for cls in (COCOeval, FastCOCOeval):
        ev = cls(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, 1000]
        ev.params.areaRng = [[0, 1e10], [0, 256], [256, 2304], [2304, 1e10]]
        ev.params.areaRngLbl = ["all", "small", "medium", "large"]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
        results.append(ev)
    ref, fast = results
    assert len(ref.evalImgs) == len(fast.evalImgs)
    for a, b in zip(ref.evalImgs, fast.evalImgs, strict=True):
        if a is None:
            assert b is None
            continue
        for key in ("dtIds", "gtIds", "dtScores"):
            assert list(a[key]) == list(b[key])
        for key in ("dtMatches", "gtMatches", "gtIgnore", "dtIgnore"):
            np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(ref.eval["precision"], fast.eval["precision"])
    assert 0.05 < np.mean(fast.eval["precision"][:, :, 0, 0, -1]) < 0.95  # a non-trivial case


ISBI_LABELS = Path(__file__).parents[2] / "shared" / "data" / "isbi2012_membrane" / "label"


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not ISBI_LABELS.is_dir(), reason="../shared/data/isbi2012_membrane is absent")
def test_agrees_with_stock_pycocotools_on_real_labels():
    """In-memory build + FastCOCOeval vs. the stock path (COCO json dicts, loadRes, COCOeval)."""
    from pycocotools.coco import COCO
    from scipy import ndimage

    from cellrcnn.io import read_label_image

    rng = np.random.default_rng(0)
    images, gt_anns, dt_anns, img_list = [], [], [], []
    for img_id, path in enumerate(sorted(ISBI_LABELS.glob("*.png"))[:2], start=1):
        gt = ndimage.label(read_label_image(path) == 255)[0]
        pred = np.roll(gt, (2, -1), axis=(0, 1))
        pred[np.isin(pred, np.arange(0, gt.max() + 1, 5))] = 0
        im = image_from_labels(gt, pred)
        im.dt_scores = rng.random(len(im.dt_scores))
        images.append(im)
        img_list.append({"id": img_id, "height": gt.shape[0], "width": gt.shape[1]})
        for rle in im.gt_rles:
            seg = {"size": rle["size"], "counts": rle["counts"].decode()}
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": img_id, "category_id": 1, "iscrowd": 0,
                            "segmentation": seg, "area": float(mask_utils.area(rle)),
                            "bbox": list(map(float, mask_utils.toBbox(rle)))})  # fmt: skip
        for rle, s in zip(im.dt_rles, im.dt_scores, strict=True):
            dt_anns.append({"image_id": img_id, "category_id": 1, "segmentation": rle, "score": float(s)})
    coco_gt = COCO()
    coco_gt.dataset = {"images": img_list, "annotations": gt_anns, "categories": [{"id": 1, "name": "cell"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dt_anns), "segm")
        ev.params.maxDets = [1, 100, 1000]
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"][:, :, :, 0, -1]
    ours = evaluate_coco(images, "segm", max_dets=(1, 100, 1000))
    assert ours["segm_AP"] == pytest.approx(np.mean(p[p > -1]), abs=1e-12)
    assert ours["segm_AP50"] == pytest.approx(np.mean(p[0][p[0] > -1]), abs=1e-12)
    assert 0.1 < ours["segm_AP"] < 0.9
