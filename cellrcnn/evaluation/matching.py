"""Object- and pixel-level metrics over label images, as pure numpy functions.

A label image is a 2-D integer array, 0 = background, one value per object; values need
not be consecutive. Conventions used everywhere in this module:

- IoU is computed in pixels: |G ∩ P| / |G ∪ P|.
- A GT object and a prediction *match* at threshold ``t`` when their IoU is ``>= t``
  (the stardist convention). Matching is one-to-one: for ``t > 0.5`` each object has at most
  one partner with IoU >= t, so the matching is unique; at ``t <= 0.5`` conflicts are resolved by
  an optimal assignment (``scipy.optimize.linear_sum_assignment``) that first maximises the
  number of matches and then their summed IoU.
- A ratio whose numerator and denominator are both 0 is 1.0 when there is neither GT nor a
  prediction (perfect agreement on an empty field) and 0.0 otherwise.
- ``csi`` = TP / (TP + FP + FN) (the "critical success index"; the per-threshold term of the
  2018 Data Science Bowl score). It is not an average precision.
- Panoptic quality: PQ = SQ * RQ, SQ = mean IoU of matched pairs, RQ = F1
  = TP / (TP + FP/2 + FN/2), so PQ = sum of matched IoU / (TP + FP/2 + FN/2).

Pooled versions over a set add TP/FP/FN (and the summed IoU) over images before taking the
ratio: :class:`MatchCounts` supports ``+`` and :func:`pool`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

#: IoU thresholds of the 2018 Data Science Bowl score: 0.50, 0.55, ..., 0.95.
DSB_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.round(np.arange(0.5, 1.0, 0.05), 2))


def _ratio(num: float, den: float, empty: bool) -> float:
    if den > 0:
        return float(num) / float(den)
    return 1.0 if empty else 0.0


@dataclass(frozen=True)
class MatchCounts:
    """TP/FP/FN of a one-to-one matching at one IoU threshold; add them to pool over images."""

    threshold: float
    tp: int = 0
    fp: int = 0
    fn: int = 0
    sum_iou: float = 0.0  # summed IoU of the matched pairs (for SQ and PQ)

    def __add__(self, other: MatchCounts) -> MatchCounts:
        if not np.isclose(self.threshold, other.threshold):
            raise ValueError(f"cannot pool counts at IoU {self.threshold} and {other.threshold}")
        return MatchCounts(
            self.threshold,
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.sum_iou + other.sum_iou,
        )

    @property
    def n_gt(self) -> int:
        return self.tp + self.fn

    @property
    def n_pred(self) -> int:
        return self.tp + self.fp

    @property
    def _empty(self) -> bool:
        return self.tp + self.fp + self.fn == 0

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp, self._empty)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn, self._empty)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, self._empty)

    @property
    def csi(self) -> float:
        """TP / (TP + FP + FN)."""
        return _ratio(self.tp, self.tp + self.fp + self.fn, self._empty)

    @property
    def sq(self) -> float:
        """Segmentation quality: mean IoU of the matched pairs (1.0 on an empty field, 0.0 with no match)."""
        return _ratio(self.sum_iou, self.tp, self._empty)

    @property
    def pq(self) -> float:
        """Panoptic quality SQ * RQ."""
        return _ratio(self.sum_iou, self.tp + 0.5 * self.fp + 0.5 * self.fn, self._empty)


def pool(counts: Iterable[MatchCounts]) -> MatchCounts:
    """Sum per-image counts at one threshold (pooled metrics over a set)."""
    counts = list(counts)
    if not counts:
        raise ValueError("pool() needs at least one MatchCounts")
    total = counts[0]
    for c in counts[1:]:
        total = total + c
    return total


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label image -> (ids present (sorted, no 0), areas in pixels, flat index 0..n (0 = background))."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top < 4 * flat.size + 1024:  # dense lookup: linear time, no sort
        counts = np.bincount(flat, minlength=top + 1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids, counts[ids], lut[flat]
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids.size and ids[0] == 0:
        ids, counts = ids[1:], counts[1:]
    else:
        inverse = inverse + 1
    return ids, counts, inverse.ravel()


def _check_labels(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"GT shape {gt.shape} differs from prediction shape {pred.shape}")
    for name, a in (("GT", gt), ("prediction", pred)):
        if a.dtype.kind not in "iub":
            raise ValueError(f"{name} label image must be integer, got {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name} label image holds negative values")
    return gt.astype(np.int64, copy=False), pred.astype(np.int64, copy=False)


@dataclass(frozen=True)
class Overlaps:
    """Sparse overlap table of two label images.

    ``gt_ids`` (G), ``pred_ids`` (P): object labels; ``gt_areas``, ``pred_areas``: pixels;
    ``gi``, ``pi``: indices into ``gt_ids``/``pred_ids`` of every overlapping pair (K);
    ``inter``: intersection in pixels (K); ``iou``: IoU of each pair (K).
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_areas: np.ndarray
    pred_areas: np.ndarray
    gi: np.ndarray
    pi: np.ndarray
    inter: np.ndarray
    iou: np.ndarray

    @classmethod
    def from_labels(cls, gt: np.ndarray, pred: np.ndarray) -> Overlaps:
        """One joint histogram of (gt, pred) label pairs: linear in pixels, no per-object loop."""
        gt, pred = _check_labels(gt, pred)
        gt_ids, gt_areas, g = _compact(gt)
        pred_ids, pred_areas, p = _compact(pred)
        both = (g > 0) & (p > 0)
        n_p = pred_ids.size
        code = (g[both] - 1) * n_p + (p[both] - 1)
        if gt_ids.size * n_p <= 4 * code.size + 1_000_000:
            hist = np.bincount(code, minlength=gt_ids.size * n_p)
            pairs = np.flatnonzero(hist)
            inter = hist[pairs]
        else:  # many objects: a sort of the overlapping pixels beats a huge dense histogram
            pairs, inter = np.unique(code, return_counts=True)
        gi, pi = np.divmod(pairs, max(n_p, 1))
        union = gt_areas[gi] + pred_areas[pi] - inter
        return cls(gt_ids, pred_ids, gt_areas, pred_areas, gi, pi, inter, inter / union)

    def dense_iou(self) -> np.ndarray:
        """G×P IoU matrix (float64)."""
        m = np.zeros((self.gt_ids.size, self.pred_ids.size))
        m[self.gi, self.pi] = self.iou
        return m


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every GT object with every prediction.

    Returns ``(iou G×P float64, gt_ids G, pred_ids P)``; rows/columns follow the sorted label values.
    """
    ov = Overlaps.from_labels(gt, pred)
    return ov.dense_iou(), ov.gt_ids, ov.pred_ids


@dataclass(frozen=True)
class Matching:
    """One-to-one matching at one threshold: matched label pairs, their IoU, and the counts."""

    threshold: float
    gt_ids: np.ndarray  # matched GT labels (M)
    pred_ids: np.ndarray  # matched predicted labels (M)
    ious: np.ndarray  # IoU of each matched pair (M)
    counts: MatchCounts


def _match_pairs(ov: Overlaps, threshold: float) -> np.ndarray:
    """Indices into the overlap table of the pairs kept by the one-to-one matching."""
    cand = np.flatnonzero((ov.iou >= threshold) & (ov.inter > 0))
    if cand.size == 0:
        return cand
    g_deg = np.bincount(ov.gi[cand], minlength=ov.gt_ids.size)
    p_deg = np.bincount(ov.pi[cand], minlength=ov.pred_ids.size)
    free = (g_deg[ov.gi[cand]] == 1) & (p_deg[ov.pi[cand]] == 1)
    keep = cand[free]  # isolated pairs belong to every optimal matching
    rest = cand[~free]
    if rest.size:
        rows, r_inv = np.unique(ov.gi[rest], return_inverse=True)
        cols, c_inv = np.unique(ov.pi[rest], return_inverse=True)
        # cardinality first (1 per match), then summed IoU (total tie-break < 0.5 < one match)
        n = min(rows.size, cols.size)
        cost = np.zeros((rows.size, cols.size))
        cost[r_inv, c_inv] = -(1.0 + ov.iou[rest] / (2.0 * n))
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < 0
        lookup = {(int(a), int(b)): int(k) for a, b, k in zip(r_inv, c_inv, rest, strict=True)}
        keep = np.concatenate(
            [keep, [lookup[(int(a), int(b))] for a, b in zip(r[ok], c[ok], strict=True)]]
        ).astype(np.int64)
    return keep


def match_overlaps(ov: Overlaps, threshold: float = 0.5) -> Matching:
    """One-to-one matching of a precomputed :class:`Overlaps` at IoU >= ``threshold``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"IoU threshold must lie in [0, 1], got {threshold}")
    keep = _match_pairs(ov, threshold)
    tp = int(keep.size)
    counts = MatchCounts(
        float(threshold), tp, int(ov.pred_ids.size) - tp, int(ov.gt_ids.size) - tp, float(ov.iou[keep].sum())
    )
    return Matching(float(threshold), ov.gt_ids[ov.gi[keep]], ov.pred_ids[ov.pi[keep]], ov.iou[keep], counts)


def match(gt: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> Matching:
    """One-to-one matching of two H×W label images at IoU >= ``threshold``."""
    return match_overlaps(Overlaps.from_labels(gt, pred), threshold)


def match_counts(gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = (0.5,)) -> list[MatchCounts]:
    """TP/FP/FN at several thresholds from one overlap computation."""
    ov = Overlaps.from_labels(gt, pred)
    return [match_overlaps(ov, t).counts for t in thresholds]


def dsb_score(gt: np.ndarray, pred: np.ndarray) -> float:
    """2018 Data Science Bowl score of one image: mean over t in 0.50:0.05:0.95 of TP/(TP+FP+FN).

    Empty GT and empty prediction -> 1.0; exactly one of them empty -> 0.0.
    """
    return float(np.mean([c.csi for c in match_counts(gt, pred, DSB_THRESHOLDS)]))


def f1(gt: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """Object F1 = 2TP / (2TP + FP + FN) at IoU >= ``threshold``."""
    return match(gt, pred, threshold).counts.f1


def precision(gt: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """Object precision TP / (TP + FP) at IoU >= ``threshold``."""
    return match(gt, pred, threshold).counts.precision


def recall(gt: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """Object recall TP / (TP + FN) at IoU >= ``threshold``."""
    return match(gt, pred, threshold).counts.recall


def pq(gt: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """Panoptic quality SQ * RQ at IoU >= ``threshold`` (0.5 is the panoptic-segmentation standard)."""
    return match(gt, pred, threshold).counts.pq


#: Object-size bins of :func:`size_counts`: equivalent diameter (px) from each edge to the next.
SIZE_EDGES: tuple[float, ...] = (0.0, 12.0, 24.0, 48.0)


def size_bin_names(edges: Sequence[float] = SIZE_EDGES) -> list[str]:
    """``d0-12``, ``d12-24``, ..., ``d48+``: one name per bin of :func:`size_counts`."""
    names = [f"d{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return [*names, f"d{edges[-1]:g}+"]


def size_counts(ov: Overlaps, matched: Matching, edges: Sequence[float] = SIZE_EDGES) -> np.ndarray:
    """Per GT size bin (equivalent diameter sqrt(4 area / pi) in px, bins from ``edges``):
    rows ``[n_gt, n_matched, summed IoU of the matches]`` (B×3, float64; add them to pool).

    Tells a detection failure (small objects missed: low matched share) from a mask failure
    (large objects found but outlined coarsely: low IoU per match)."""
    diameters = np.sqrt(4.0 * ov.gt_areas / np.pi)
    bins = np.searchsorted(np.asarray(edges, np.float64), diameters, side="right") - 1
    out = np.zeros((len(edges), 3))
    np.add.at(out[:, 0], bins, 1.0)
    where = np.searchsorted(ov.gt_ids, matched.gt_ids)
    np.add.at(out[:, 1], bins[where], 1.0)
    np.add.at(out[:, 2], bins[where], matched.ious)
    return out


def significant_pairs(ov: Overlaps, min_fraction: float = 0.5) -> np.ndarray:
    """Boolean K: overlap pairs whose intersection holds >= ``min_fraction`` of the smaller object."""
    smaller = np.minimum(ov.gt_areas[ov.gi], ov.pred_areas[ov.pi])
    return ov.inter >= min_fraction * smaller


def splits(gt: np.ndarray, pred: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """GT labels split into two or more predictions (over-segmentation).

    Rule: a (GT, prediction) pair overlaps *significantly* when their intersection holds at least
    ``min_fraction`` of the smaller of the two objects (a fragment lying mostly inside a GT object,
    or a GT object lying mostly inside a prediction). A GT object is split when it overlaps
    significantly with >= 2 predictions. The rule is symmetric: ``splits(gt, pred) == merges(pred, gt)``.
    A pair touching along a boundary (a few pixels) is not significant.
    """
    ov = Overlaps.from_labels(gt, pred)
    sig = significant_pairs(ov, min_fraction)
    deg = np.bincount(ov.gi[sig], minlength=ov.gt_ids.size)
    return ov.gt_ids[deg >= 2]


def merges(gt: np.ndarray, pred: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """Predicted labels that merge two or more GT objects (under-segmentation); rule as :func:`splits`."""
    ov = Overlaps.from_labels(gt, pred)
    sig = significant_pairs(ov, min_fraction)
    deg = np.bincount(ov.pi[sig], minlength=ov.pred_ids.size)
    return ov.pred_ids[deg >= 2]


def _foreground(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"GT shape {gt.shape} differs from prediction shape {pred.shape}")
    return gt > 0, pred > 0


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Foreground Dice 2|G∩P| / (|G|+|P|) over pixels (both empty -> 1.0)."""
    g, p = _foreground(gt, pred)
    inter, total = int(np.count_nonzero(g & p)), int(np.count_nonzero(g)) + int(np.count_nonzero(p))
    return 1.0 if total == 0 else 2.0 * inter / total


def jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    """Foreground Jaccard (pixel IoU) |G∩P| / |G∪P| (both empty -> 1.0)."""
    g, p = _foreground(gt, pred)
    union = int(np.count_nonzero(g | p))
    return 1.0 if union == 0 else np.count_nonzero(g & p) / union


def pixel_accuracy(gt: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of pixels whose foreground/background class agrees."""
    g, p = _foreground(gt, pred)
    if g.size == 0:
        raise ValueError("pixel_accuracy of an empty (0-pixel) image is undefined")
    return float(np.count_nonzero(g == p)) / g.size
