"""Evaluator: keys, overlap resolution, box-only GT, pooling, and gathering across ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellrcnn.data.masks import masks_to_boxes_xyxy
from cellrcnn.data.target import make_target
from cellrcnn.evaluation import Evaluator

KEYS = {
    "segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "dsb_score", "f1@0.5", "f1@0.7", "precision@0.5",
    "recall@0.5", "pq@0.5", "dice", "jaccard", "pixel_accuracy", "n_images", "n_gt", "n_pred",
}  # fmt: skip


def square_masks(h: int, w: int, specs) -> np.ndarray:
    """N×H×W uint8 masks of rectangles (y0, y1, x0, x1)."""
    masks = np.zeros((len(specs), h, w), np.uint8)
    for i, (y0, y1, x0, x1) in enumerate(specs):
        masks[i, y0:y1, x0:x1] = 1
    return masks


def grid_specs(n: int, step: int = 12, side: int = 8):
    cols = int(math.ceil(math.sqrt(n)))
    return [
        (y * step, y * step + side, x * step, x * step + side) for y, x in (divmod(k, cols) for k in range(n))
    ]


def target_of(masks: np.ndarray, image_id: int, has_mask=None):
    n = len(masks)
    has_mask = np.ones(n, bool) if has_mask is None else np.asarray(has_mask)
    return make_target(masks_to_boxes_xyxy(masks), np.ones(n), masks, has_mask, image_id)


def prediction_of(masks: np.ndarray, scores=None):
    n = len(masks)
    scores = np.linspace(1.0, 0.5, n) if scores is None else np.asarray(scores)
    return {
        "masks": torch.as_tensor(masks),
        "scores": torch.as_tensor(scores, dtype=torch.float32),
        "boxes": torch.as_tensor(masks_to_boxes_xyxy(masks)),
        "labels": torch.ones(n, dtype=torch.int64),
    }


def test_perfect_predictions_all_ones_and_exact_keys():
    ev = Evaluator()
    masks = square_masks(60, 60, grid_specs(16))
    ev.update(target_of(masks, 7), prediction_of(masks))
    out = ev.compute()
    assert set(out) == KEYS
    for k in KEYS - {"n_images", "n_gt", "n_pred"}:
        assert out[k] == pytest.approx(1.0), k
    assert (out["n_images"], out["n_gt"], out["n_pred"]) == (1, 16, 16)
    assert ev.per_image[0]["image_id"] == 7 and ev.per_image[0]["tp"] == 16


def test_probability_masks_and_numpy_inputs():
    masks = square_masks(40, 40, grid_specs(4))
    probs = masks[:, None].astype(np.float32) * 0.9 + 0.05  # N×1×H×W, 0.05 / 0.95
    ev = Evaluator(coco=False)
    tgt = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in target_of(masks, 0).items()}
    ev.update(
        tgt, {"masks": probs, "scores": np.ones(4), "boxes": masks_to_boxes_xyxy(masks), "labels": np.ones(4)}
    )
    out = ev.compute()
    assert out["f1@0.5"] == 1.0 and out["dsb_score"] == 1.0 and math.isnan(out["segm_AP"])


def test_overlapping_predictions_higher_score_wins():
    gt = square_masks(10, 20, [(0, 10, 0, 12), (0, 10, 12, 20)])
    pred = square_masks(10, 20, [(0, 10, 0, 20), (0, 10, 12, 20)])  # P0 covers both GT, P1 = GT 1
    ev = Evaluator()
    ev.update(target_of(gt, 0), prediction_of(pred, [0.2, 0.9]))  # P1 on top: P0 keeps GT 0's half
    assert ev.compute()["f1@0.5"] == 1.0
    ev.reset()
    ev.update(target_of(gt, 0), prediction_of(pred, [0.9, 0.2]))  # P0 on top hides P1; IoU 0.6 with GT 0
    out = ev.compute()
    assert out["f1@0.5"] == pytest.approx(2 / 3)  # TP 1, FN 1, FP 0
    assert out["f1@0.7"] == 0.0
    assert out["n_pred"] == 2
    # COCO uses the raw masks: P0 matches GT 0 at IoU 0.6, P1 matches GT 1
    assert out["segm_AP50"] == pytest.approx(1.0)


def test_pooled_f1_versus_mean_dsb():
    ev = Evaluator(coco=False)
    masks = square_masks(50, 50, grid_specs(10))
    ev.update(target_of(masks, 0), prediction_of(masks))
    one = square_masks(20, 20, [(2, 12, 2, 12)])
    ev.update(target_of(one, 1), prediction_of(np.zeros((0, 20, 20), np.uint8)))
    out = ev.compute()
    assert out["f1@0.5"] == pytest.approx(20 / 21)  # pooled TP 10, FN 1
    assert out["recall@0.5"] == pytest.approx(10 / 11) and out["precision@0.5"] == 1.0
    assert out["dsb_score"] == pytest.approx(0.5)  # mean of 1 and 0
    assert out["dice"] == pytest.approx(0.5) and out["pixel_accuracy"] == pytest.approx((1 + 300 / 400) / 2)
    assert [r["fn"] for r in ev.per_image] == [0, 1]


def test_empty_gt_and_empty_prediction():
    ev = Evaluator()
    empty = np.zeros((0, 16, 16), np.uint8)
    ev.update(target_of(empty, 0), prediction_of(empty))
    out = ev.compute()
    assert out["dsb_score"] == 1.0 and out["f1@0.5"] == 1.0 and out["dice"] == 1.0
    assert math.isnan(out["segm_AP"]) and math.isnan(out["bbox_AP"])  # AP undefined without GT
    assert Evaluator().compute()["n_images"] == 0  # nothing added: no crash, nan metrics


def test_box_only_gt_counts_for_bbox_only():
    masks = square_masks(40, 40, grid_specs(4))
    ev = Evaluator()
    boxes_only = np.zeros_like(masks)
    tgt = make_target(masks_to_boxes_xyxy(masks), np.ones(4), boxes_only, np.zeros(4, bool), 3)
    ev.update(tgt, prediction_of(masks))
    out = ev.compute()
    assert out["bbox_AP"] == 1.0
    assert math.isnan(out["segm_AP"]) and math.isnan(out["dsb_score"]) and math.isnan(out["f1@0.5"])
    assert out["n_gt"] == 4 and ev.per_image[0]["tp"] is None
    # adding a fully annotated image makes the label metrics defined again (from that image only)
    ev.update(target_of(masks, 4), prediction_of(masks[:2]))
    out = ev.compute()
    assert out["recall@0.5"] == pytest.approx(0.5) and out["segm_AP"] < 1.0


def test_shape_mismatch_names_image():
    ev = Evaluator()
    with pytest.raises(ValueError, match="image 5"):
        ev.update(target_of(square_masks(10, 10, [(0, 5, 0, 5)]), 5), prediction_of(square_masks(12, 10, [])))


def test_update_labels_matches_update():
    masks = square_masks(30, 30, grid_specs(5))
    lab = np.zeros((30, 30), np.int64)
    for i, m in enumerate(masks):
        lab[m > 0] = 10 * (i + 1)
    shifted = np.roll(lab, 2, axis=0)
    a, b = Evaluator(), Evaluator()
    a.update_labels(lab, shifted, image_id=0)
    pm = np.stack([shifted == 10 * (i + 1) for i in range(5)]).astype(np.uint8)
    b.update(target_of(masks, 0), prediction_of(pm, np.ones(5)))
    out = a.compute()
    assert out == b.compute()
    assert out["segm_AP50"] == 1.0 and out["segm_AP75"] == 0.0  # IoU 6/10 = 0.6


def _ddp_worker(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ev = Evaluator()
        for image_id in _ddp_shard(rank):
            gt, pred = _ddp_image(image_id)
            ev.update(target_of(gt, image_id), prediction_of(pred))
        results[rank] = (ev.compute(), [r["image_id"] for r in ev.per_image])
    finally:
        dist.destroy_process_group()


def _ddp_shard(rank: int) -> list[int]:
    return [0, 2, 4] if rank == 0 else [1, 3, 0]  # image 0 repeated, as DistributedSampler pads


def _ddp_image(image_id: int):
    gt = square_masks(40, 40, grid_specs(4 + image_id))
    return gt, gt[: 2 + image_id // 2]


@pytest.mark.slow
def test_gathers_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    single = Evaluator()
    for image_id in range(5):
        gt, pred = _ddp_image(image_id)
        single.update(target_of(gt, image_id), prediction_of(pred))
    expected = single.compute()
    for rank in range(2):
        got, ids = results[rank]
        assert sorted(ids) == [0, 1, 2, 3, 4]
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k] == pytest.approx(expected[k], nan_ok=True), k
    assert expected["n_images"] == 5 and expected["recall@0.5"] < 1.0


def test_extra_metrics_recall_and_outline_quality_per_object_size():
    # 16 squares 8×8 (diameter 9 px), one 30×30 (33.9 px): the prediction misses 4 small ones and
    # outlines the large one with IoU 0.5 (the lower half of a 30×60 box is empty)
    small = grid_specs(16)
    gt = square_masks(120, 120, [*small, (60, 90, 60, 90)])
    pred = square_masks(120, 120, [*small[4:], (60, 90, 60, 90)])
    pred[-1, 90:120, 60:90] = 1
    ev = Evaluator(extra_metrics=True)
    ev.update(target_of(gt, 1), prediction_of(pred))
    out = ev.compute()
    assert (out["n_gt_d0-12"], out["n_gt_d24-48"], out["n_gt_d48+"]) == (16, 1, 0)
    assert out["recall@0.5_d0-12"] == pytest.approx(12 / 16)
    assert out["sq@0.5_d0-12"] == pytest.approx(1.0)
    assert out["recall@0.5_d24-48"] == 1.0 and out["sq@0.5_d24-48"] == pytest.approx(0.5)
    assert out["sq@0.5"] == pytest.approx(12.5 / 13)
    assert math.isnan(out["recall@0.5_d48+"])
