"""Known-answer tests of the label-image metrics (answers follow from how each case is built)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from cellrcnn.evaluation import matching as m


def squares(shape, specs):
    """Label image with axis-aligned squares: specs = [(label, y, x, side), ...]."""
    lab = np.zeros(shape, np.int64)
    for label, y, x, s in specs:
        lab[y : y + s, x : x + s] = label
    return lab


def shifted_pair(side: int, shifts: list[int], gap: int = 40):
    """GT squares and the same squares shifted right by k pixels: IoU = (side-k)/(side+k)."""
    n = len(shifts)
    gt = squares((side + 10, gap * n + 20), [(i + 1, 5, 5 + gap * i, side) for i in range(n)])
    pred = np.zeros_like(gt)
    for i, k in enumerate(shifts):
        pred[5 : 5 + side, 5 + gap * i + k : 5 + gap * i + k + side] = 100 + i
    return gt, pred, np.array([(side - k) / (side + k) for k in shifts])


def test_iou_matrix_shifted_squares_exact():
    gt, pred, expected = shifted_pair(20, [0, 2, 4, 6, 8])
    iou, gt_ids, pred_ids = m.iou_matrix(gt, pred)
    assert gt_ids.tolist() == [1, 2, 3, 4, 5]
    assert pred_ids.tolist() == [100, 101, 102, 103, 104]
    np.testing.assert_allclose(np.diag(iou), expected, rtol=0, atol=1e-12)
    assert np.count_nonzero(iou - np.diag(np.diag(iou))) == 0
    assert expected[2] == pytest.approx(2 / 3)


def test_dsb_score_from_known_ious():
    gt, pred, ious = shifted_pair(20, [0, 2, 4, 6, 8])  # IoU 1, .818, .667, .538, .429
    n = len(ious)
    per_t = []
    for t in m.DSB_THRESHOLDS:
        tp = int(np.sum(ious >= t))
        per_t.append(tp / (tp + 2 * (n - tp)))
    assert m.dsb_score(gt, pred) == pytest.approx(np.mean(per_t), abs=1e-12)
    # single object at IoU 2/3 matches at 0.50..0.65: 4 of 10 thresholds
    g1, p1, _ = shifted_pair(20, [4])
    assert m.dsb_score(g1, p1) == pytest.approx(0.4)


def test_match_threshold_is_inclusive():
    gt = squares((10, 30), [(1, 0, 0, 10)])
    pred = np.zeros_like(gt)
    pred[0:10, 0:5] = 7  # IoU exactly 0.5
    assert m.match(gt, pred, 0.5).counts.tp == 1
    assert m.match(gt, pred, 0.5 + 1e-9).counts.tp == 0


def test_empty_cases():
    z = np.zeros((8, 8), np.int64)
    one = squares((8, 8), [(3, 1, 1, 4)])
    assert m.dsb_score(z, z) == 1.0
    assert m.dsb_score(one, z) == 0.0 and m.dsb_score(z, one) == 0.0
    c = m.match(z, z).counts
    assert (c.tp, c.fp, c.fn) == (0, 0, 0)
    assert c.f1 == c.precision == c.recall == c.pq == 1.0
    c = m.match(one, z).counts
    assert (c.tp, c.fp, c.fn) == (0, 0, 1) and c.precision == 0.0 and c.recall == 0.0 and c.f1 == 0.0
    c = m.match(z, one).counts
    assert (c.tp, c.fp, c.fn) == (0, 1, 0) and c.precision == 0.0 and c.pq == 0.0
    assert m.dice(z, z) == 1.0 and m.jaccard(z, z) == 1.0 and m.pixel_accuracy(z, z) == 1.0
    assert m.iou_matrix(z, one)[0].shape == (0, 1)


def test_split_and_merge():
    gt = squares((20, 40), [(1, 0, 0, 20)])
    pred = np.zeros_like(gt)
    pred[0:20, 0:10] = 4
    pred[0:20, 10:20] = 9  # two halves, IoU 0.5 each
    assert m.splits(gt, pred).tolist() == [1]
    assert m.merges(gt, pred).size == 0
    assert m.merges(pred, gt).tolist() == [1]  # the rule is symmetric
    mt = m.match(gt, pred, 0.5)
    assert (mt.counts.tp, mt.counts.fp, mt.counts.fn) == (1, 1, 0)
    assert mt.ious.tolist() == [0.5]
    assert m.match(gt, pred, 0.55).counts.tp == 0
    # merge: one prediction over two GT squares; GT 3 is split between a 2-px fragment lying inside it
    # and a prediction holding 90% of it (and sticking out)
    gt2 = squares((10, 40), [(1, 0, 0, 10), (2, 0, 10, 10), (3, 0, 25, 10)])
    pred2 = np.zeros_like(gt2)
    pred2[0:10, 0:20] = 5
    pred2[0:2, 25:26] = 6
    pred2[0:10, 26:38] = 7
    assert m.merges(gt2, pred2).tolist() == [5]
    assert m.splits(gt2, pred2).tolist() == [3]
    assert m.splits(gt2, pred2, min_fraction=1.0).size == 0


def test_touching_boundary_is_not_a_split():
    gt = squares((20, 40), [(1, 0, 0, 20)])
    pred = np.zeros_like(gt)
    pred[0:20, 0:19] = 1
    pred[0:20, 19:30] = 2  # overlaps GT on one column = 20 of 220 pixels
    assert m.splits(gt, pred).size == 0


def test_low_threshold_uses_optimal_assignment():
    # 1-row image of intervals. A=[0,10), B=[10,20); X=[4,14), Y=[0,4)
    # IoU: X-A 6/14, X-B 4/16, Y-A 4/10. Greedy X-A leaves 1 match; optimal X-B + Y-A gives 2.
    gt = np.zeros((1, 30), np.int64)
    gt[0, 0:10], gt[0, 10:20] = 1, 2
    pred = np.zeros_like(gt)
    pred[0, 4:14], pred[0, 0:4] = 10, 11
    mt = m.match(gt, pred, 0.25)
    assert mt.counts.tp == 2
    assert sorted(zip(mt.gt_ids.tolist(), mt.pred_ids.tolist(), strict=True)) == [(1, 11), (2, 10)]
    assert mt.counts.sum_iou == pytest.approx(0.25 + 0.4)
    mt = m.match(gt, pred, 0.3)  # only A is reachable: the better partner X wins
    assert (mt.counts.tp, mt.gt_ids.tolist(), mt.pred_ids.tolist()) == (1, [1], [10])


def _brute_force_max_matches(iou: np.ndarray, t: float) -> int:
    g, p = iou.shape
    best = 0
    for k in range(min(g, p), 0, -1):
        for rows in itertools.combinations(range(g), k):
            for cols in itertools.permutations(range(p), k):
                if all(iou[r, c] >= t for r, c in zip(rows, cols, strict=True)):
                    return k
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matching_cardinality_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    gt = np.zeros((1, 60), np.int64)
    pred = np.zeros_like(gt)
    for lab, arr in ((gt, 5), (pred, 5)):
        cuts = np.sort(rng.choice(np.arange(1, 60), size=2 * arr, replace=False))
        for i in range(arr):
            lab[0, cuts[2 * i] : cuts[2 * i + 1]] = i + 1
    iou, _, _ = m.iou_matrix(gt, pred)
    for t in (0.05, 0.2, 0.35, 0.5, 0.7):
        assert m.match(gt, pred, t).counts.tp == _brute_force_max_matches(iou, t)


def test_crowded_field_nonconsecutive_labels():
    rng = np.random.default_rng(1)
    n_side, step, side = 15, 12, 9  # 225 objects
    ids = rng.permutation(n_side * n_side) * 7 + 1000
    specs = [
        (int(ids[i * n_side + j]), i * step, j * step, side) for i in range(n_side) for j in range(n_side)
    ]
    gt = squares((n_side * step, n_side * step), specs)
    pred = np.roll(gt, 1, axis=1)  # every object shifted by 1 px: IoU = 8/10
    dropped = ids[:25]
    pred[np.isin(pred, dropped)] = 0
    c = m.match(gt, pred, 0.5).counts
    assert (c.tp, c.fp, c.fn) == (200, 0, 25)
    assert c.sq == pytest.approx(0.8)
    assert m.f1(gt, pred, 0.8) == pytest.approx(2 * 200 / (2 * 200 + 25))
    assert m.f1(gt, pred, 0.81) == 0.0
    assert m.recall(gt, pred) == pytest.approx(200 / 225) and m.precision(gt, pred) == 1.0


def test_huge_label_values_and_speed():
    lab = np.zeros((1024, 1024), np.int64)
    k = 0
    for y in range(0, 1024, 24):
        for x in range(0, 1024, 24):
            k += 1
            lab[y + 2 : y + 20, x + 2 : x + 20] = k
    big = np.where(lab > 0, lab + 3_000_000_000, 0)  # forces the sort-based path
    t0 = time.perf_counter()
    score = m.dsb_score(lab, big)
    elapsed = time.perf_counter() - t0
    assert k > 1000 and score == 1.0
    assert elapsed < 5.0, f"dsb_score on {k} objects took {elapsed:.2f}s"


def test_pq_known_value():
    # GT 1 perfect, GT 2 at IoU 2/3 (20px square shifted 4px), GT 3 missed; one false positive
    gt = squares((30, 140), [(1, 5, 5, 20), (2, 5, 45, 20), (3, 5, 85, 20)])
    pred = squares((30, 140), [(1, 5, 5, 20), (2, 5, 49, 20), (4, 5, 115, 20)])
    c = m.match(gt, pred, 0.5).counts
    assert (c.tp, c.fp, c.fn) == (2, 1, 1)
    sq, rq = (1 + 2 / 3) / 2, 2 / (2 + 0.5 + 0.5)
    assert c.sq == pytest.approx(sq) and c.f1 == pytest.approx(rq)
    assert m.pq(gt, pred) == pytest.approx(sq * rq) == pytest.approx(5 / 9)


def test_pixel_metrics_tiny():
    gt = np.array([[1, 1, 0, 0]])
    pred = np.array([[0, 2, 2, 0]])
    assert m.dice(gt, pred) == pytest.approx(0.5)
    assert m.jaccard(gt, pred) == pytest.approx(1 / 3)
    assert m.pixel_accuracy(gt, pred) == pytest.approx(0.5)
    assert m.pixel_accuracy(gt, gt) == 1.0 and m.dice(gt, gt) == 1.0


def test_pooled_counts_sum_before_ratio():
    a = m.MatchCounts(0.5, tp=10, fp=0, fn=0, sum_iou=9.0)
    b = m.MatchCounts(0.5, tp=0, fp=0, fn=1)
    p = m.pool([a, b])
    assert (p.tp, p.fp, p.fn) == (10, 0, 1)
    assert p.f1 == pytest.approx(20 / 21)  # the mean of per-image F1 would be 0.5
    with pytest.raises(ValueError):
        a + m.MatchCounts(0.7)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        m.match(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="integer"):
        m.match(np.zeros((4, 4)), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="shape"):
        m.dice(np.zeros((4, 4), int), np.zeros((5, 4), int))


def test_size_counts_tell_missed_small_from_coarse_large():
    # GT: two 6×6 squares (diameter 6.8 px, bin d0-12) and one 40×40 square (45.1 px, bin d24-48);
    # one small square is found exactly, the other missed, the large one found with IoU 0.8
    gt = squares((60, 100), [(1, 0, 0, 6), (2, 10, 0, 6), (3, 20, 50, 40)])
    pred = np.zeros_like(gt)
    pred[0:6, 0:6] = 8
    pred[20:52, 50:90] = 9  # 32 of the 40 rows: IoU 1280 / 1600
    ov = m.Overlaps.from_labels(gt, pred)
    counts = m.size_counts(ov, m.match_overlaps(ov, 0.5))
    assert m.size_bin_names() == ["d0-12", "d12-24", "d24-48", "d48+"]
    np.testing.assert_allclose(counts, [[2, 1, 1.0], [0, 0, 0], [1, 1, 0.8], [0, 0, 0]])
