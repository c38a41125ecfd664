"""One evaluator for validation, ``evaluate.py`` and the command line: reset / update / compute.

Per image, :meth:`Evaluator.update` turns the predicted masks into a label image (where masks
overlap the higher score wins; masks empty after thresholding vanish) for the label-image metrics,
and keeps the raw masks and scores (as RLE) for COCO AP. Only small per-image records are kept,
so a full validation set fits in memory; :meth:`compute` gathers them across ranks.

Which GT counts where:
- COCO bbox AP: every GT object.
- COCO segm AP: GT with a mask; a box-only GT object is an ignore region (see ``coco_metrics``).
- Label-image metrics (``dsb_score``, ``f1@t``, ``precision@t``, ``recall@t``, ``pq@t``, ``dice``,
  ``jaccard``, ``pixel_accuracy``): only images whose GT objects all have masks; an image with a
  box-only object is skipped there, because a correct prediction on it would count as a false
  positive. With no such image at all these metrics are ``nan``.

``f1@t`` is reported for every ``t`` in ``iou_thresholds``; ``precision@t``, ``recall@t`` and
``pq@t`` for the first one. Object counts are pooled over the set (TP/FP/FN summed, then the
ratio); ``dsb_score``, ``dice``, ``jaccard`` and ``pixel_accuracy`` are means over images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data.masks import masks_to_boxes_xyxy, masks_to_label_image
from . import matching
from .coco_metrics import DEFAULT_MAX_DETS, CocoImage, evaluate_coco, label_image_to_rles, masks_to_rles


def _np(x: Any) -> np.ndarray:
    """torch tensor or array-like -> numpy (on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _tkey(t: float) -> str:
    return f"{float(t):g}"


class Evaluator:
    """Accumulates per-image results and computes the project's metric set.

    Args:
        iou_thresholds: matching thresholds for ``f1@t`` (first one also for precision/recall/pq).
        coco: compute COCO AP (``segm_*``, ``bbox_*``); ``nan`` when False.
        max_dets: COCO detections kept per image (AP read at the largest).
        mask_threshold: probability masks (float) are binarised at ``> mask_threshold``.
        extra_metrics: also return splits/merges counts, COCO AP per area range, ``bbox_AP50``,
            precision/recall/pq at every threshold, and segmentation quality and recall per
            object-size bin (``sq@t``, ``recall@t_d12-24``, ...; see ``matching.size_counts``).
    """

    def __init__(
        self,
        iou_thresholds: Sequence[float] = (0.5, 0.7),
        coco: bool = True,
        max_dets: Sequence[int] = DEFAULT_MAX_DETS,
        mask_threshold: float = 0.5,
        extra_metrics: bool = False,
    ) -> None:
        if not iou_thresholds:
            raise ValueError("iou_thresholds must not be empty")
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.coco = coco
        self.max_dets = tuple(max_dets)
        self.mask_threshold = mask_threshold
        self.extra_metrics = extra_metrics
        self._thresholds = sorted({round(t, 6) for t in (*self.iou_thresholds, *matching.DSB_THRESHOLDS)})
        self.reset()

    def reset(self) -> None:
        self._records: list[dict] = []
        self._gathered: list[dict] | None = None

    # ------------------------------------------------------------------ update
    def update(self, target: dict, prediction: dict) -> None:
        """Add one image: ``target`` a Target (torch or numpy), ``prediction`` a dict with ``masks``
        (N×H×W uint8/bool, or N×1×H×W / N×H×W float probabilities), ``scores`` N, ``boxes`` N×4 xyxy,
        ``labels`` N (scores default to 1, labels to 1, boxes to the mask boxes)."""
        image_id = int(_np(target.get("image_id", len(self._records))))
        gt_masks = _np(target["masks"])
        n_gt = int(gt_masks.shape[0]) if gt_masks.ndim == 3 else 0
        has_mask = _np(target.get("has_mask", np.ones(n_gt, bool))).astype(bool).reshape(-1)
        gt_labels = _np(target.get("labels", np.ones(n_gt, np.int64))).reshape(-1)
        gt_boxes = _np(target["boxes"]).reshape(-1, 4) if "boxes" in target else masks_to_boxes_xyxy(gt_masks)

        masks = prediction.get("masks")
        pm = None if masks is None else _np(masks)
        if pm is not None and pm.ndim == 4:
            pm = pm[:, 0]
        if pm is not None:
            pm = (pm > self.mask_threshold) if pm.dtype.kind == "f" else (pm > 0)
        n_pred = len(pm) if pm is not None else len(_np(prediction["boxes"]))
        scores = _np(prediction.get("scores", np.ones(n_pred))).astype(np.float64).reshape(-1)
        labels = _np(prediction.get("labels", np.ones(n_pred, np.int64))).reshape(-1)
        boxes = _np(prediction["boxes"]).reshape(-1, 4) if "boxes" in prediction else masks_to_boxes_xyxy(pm)

        if gt_masks.ndim == 3:
            h, w = gt_masks.shape[1:]
        elif pm is not None and pm.ndim == 3:
            h, w = pm.shape[1:]
        else:
            raise ValueError(f"image {image_id}: cannot tell the image size (no N×H×W masks)")
        if pm is not None and pm.shape[1:] != (h, w):
            raise ValueError(f"image {image_id}: predicted masks are {pm.shape[1:]}, GT masks are {(h, w)}")
        if not (len(scores) == len(labels) == len(boxes) == n_pred):
            raise ValueError(
                f"image {image_id}: {n_pred} masks, {len(scores)} scores, {len(labels)} labels, {len(boxes)} boxes"
            )

        scored = bool(has_mask.all()) and pm is not None
        gt_lab = masks_to_label_image(gt_masks[has_mask]) if n_gt else np.zeros((h, w), np.int64)
        pred_lab = (
            masks_to_label_image(pm, scores) if pm is not None and n_pred else np.zeros((h, w), np.int64)
        )
        coco_image = None
        if self.coco:
            coco_image = CocoImage(
                h,
                w,
                _xyxy_to_xywh(gt_boxes),
                gt_labels.astype(np.int64),
                [r if m else None for r, m in zip(masks_to_rles(gt_masks[:n_gt]), has_mask, strict=True)],
                _xyxy_to_xywh(boxes),
                labels.astype(np.int64),
                scores,
                None if pm is None else masks_to_rles(pm),
            )
        self._add(image_id, gt_lab if scored else None, pred_lab, n_gt, n_pred, coco_image)

    def update_labels(
        self, gt: np.ndarray, pred: np.ndarray, image_id: int | None = None, name: str | None = None
    ) -> None:
        """Add one image given as two H×W label images (0 = background). For COCO AP every
        predicted object gets score 1, so AP reflects an arbitrary ranking (see the CLI docs)."""
        gt, pred = _np(gt), _np(pred)
        if gt.shape != pred.shape or gt.ndim != 2:
            raise ValueError(
                f"{name or image_id}: GT shape {gt.shape} and prediction shape {pred.shape} differ"
            )
        image_id = len(self._records) if image_id is None else int(image_id)
        coco_image = None
        g_rles, g_ids, g_boxes = label_image_to_rles(gt) if self.coco else ([], np.unique(gt[gt > 0]), None)
        p_rles, p_ids, p_boxes = (
            label_image_to_rles(pred) if self.coco else ([], np.unique(pred[pred > 0]), None)
        )
        if self.coco:
            coco_image = CocoImage(
                *gt.shape, g_boxes, np.ones(len(g_ids), np.int64), g_rles,
                p_boxes, np.ones(len(p_ids), np.int64), np.ones(len(p_ids)), p_rles,
            )  # fmt: skip
        self._add(image_id, gt, pred, len(g_ids), len(p_ids), coco_image, name)

    def _add(self, image_id, gt_lab, pred_lab, n_gt, n_pred, coco_image, name=None) -> None:
        rec: dict[str, Any] = {
            "image_id": image_id,
            "n_gt": int(n_gt),
            "n_pred": int(n_pred),
            "coco": coco_image,
        }
        if name is not None:
            rec["name"] = name
        rec["scored"] = gt_lab is not None
        if gt_lab is not None:
            ov = matching.Overlaps.from_labels(gt_lab, pred_lab)
            matched = {t: matching.match_overlaps(ov, t) for t in self._thresholds}
            counts = {t: m.counts for t, m in matched.items()}
            rec["counts"] = {t: (c.tp, c.fp, c.fn, c.sum_iou) for t, c in counts.items()}
            rec["dsb_score"] = float(np.mean([counts[round(t, 6)].csi for t in matching.DSB_THRESHOLDS]))
            rec["dice"] = matching.dice(gt_lab, pred_lab)
            rec["jaccard"] = matching.jaccard(gt_lab, pred_lab)
            rec["pixel_accuracy"] = matching.pixel_accuracy(gt_lab, pred_lab)
            if self.extra_metrics:
                rec["size_counts"] = matching.size_counts(ov, matched[round(self.iou_thresholds[0], 6)])
                sig = matching.significant_pairs(ov)
                rec["n_splits"] = int(np.sum(np.bincount(ov.gi[sig], minlength=ov.gt_ids.size) >= 2))
                rec["n_merges"] = int(np.sum(np.bincount(ov.pi[sig], minlength=ov.pred_ids.size) >= 2))
        self._records.append(rec)
        self._gathered = None

    # ----------------------------------------------------------------- compute
    def _gather(self) -> list[dict]:
        """All ranks' records when torch.distributed is initialised (duplicates by image_id dropped,
        since DistributedSampler pads the last batch by repeating images)."""
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch is a dependency
            return list(self._records)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return list(self._records)
        parts: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._records)
        seen: set[int] = set()
        merged = []
        for rec in (r for part in parts for r in (part or [])):
            if rec["image_id"] not in seen:
                seen.add(rec["image_id"])
                merged.append(rec)
        return merged

    @property
    def per_image(self) -> list[dict]:
        """Per image: image_id, dsb_score, tp/fp/fn at the first IoU threshold, n_gt, n_pred, dice,
        jaccard, pixel_accuracy (nan/None where the image is not scored), name when known."""
        t0 = round(self.iou_thresholds[0], 6)
        out = []
        for r in self._gathered if self._gathered is not None else self._records:
            tp, fp, fn, _ = r["counts"][t0] if r["scored"] else (None, None, None, None)
            row = {
                "image_id": r["image_id"],
                "dsb_score": r.get("dsb_score", float("nan")),
                "tp": tp,
                "fp": fp,
            }
            row.update(fn=fn, n_gt=r["n_gt"], n_pred=r["n_pred"])
            row.update({k: r.get(k, float("nan")) for k in ("dice", "jaccard", "pixel_accuracy")})
            row.update({k: r[k] for k in ("name", "n_splits", "n_merges") if k in r})
            out.append(row)
        return out

    def compute(self) -> dict[str, float]:
        """The metric dict (see the module docstring); ``nan`` where a metric is undefined."""
        records = self._gather()
        self._gathered = records
        return self._metrics(records)

    def compute_groups(self, group_of: Callable[[int], str | None]) -> dict[str, dict[str, float]]:
        """The metric dict of every group of images (``group_of(image_id)``, None: in no group),
        from the records already matched: per source, modality or stain without re-scoring."""
        records = self._gather() if self._gathered is None else self._gathered
        groups: dict[str, list[dict]] = {}
        for rec in records:
            name = group_of(rec["image_id"])
            if name is not None:
                groups.setdefault(str(name), []).append(rec)
        return {name: self._metrics(recs) for name, recs in sorted(groups.items())}

    def _size_metrics(self, scored: list[dict]) -> dict[str, float]:
        """``sq@t`` and, per GT size bin, ``recall@t_<bin>`` (share found) and ``sq@t_<bin>`` (mean
        IoU of those found), ``n_gt_<bin>``: where a model loses objects, and how well it outlines."""
        t = _tkey(self.iou_thresholds[0])
        names = matching.size_bin_names()
        total = sum((r["size_counts"] for r in scored), np.zeros((len(names), 3)))
        out = {f"sq@{t}": float(total[:, 2].sum() / total[:, 1].sum()) if total[:, 1].sum() else float("nan")}
        for name, (n_gt, found, iou) in zip(names, total, strict=True):
            out[f"n_gt_{name}"] = int(n_gt)
            out[f"recall@{t}_{name}"] = float(found / n_gt) if n_gt else float("nan")
            out[f"sq@{t}_{name}"] = float(iou / found) if found else float("nan")
        return out

    def _metrics(self, records: list[dict]) -> dict[str, float]:
        nan = float("nan")
        out: dict[str, float] = {"segm_AP": nan, "segm_AP50": nan, "segm_AP75": nan, "bbox_AP": nan}
        if self.coco and records:
            images = [r["coco"] for r in records]
            segm = evaluate_coco(images, "segm", self.max_dets)
            bbox = evaluate_coco(images, "bbox", self.max_dets)
            out.update({k: segm[k] for k in ("segm_AP", "segm_AP50", "segm_AP75")}, bbox_AP=bbox["bbox_AP"])
            if self.extra_metrics:
                out.update({k: v for k, v in {**segm, **bbox}.items() if k not in out})
        elif self.extra_metrics:
            out["bbox_AP50"] = nan
        scored = [r for r in records if r["scored"]]

        def mean(key: str) -> float:
            return float(np.mean([r[key] for r in scored])) if scored else nan

        out["dsb_score"] = mean("dsb_score")
        pooled = {}
        for t in self.iou_thresholds:
            k = round(t, 6)
            pooled[t] = (
                matching.pool(matching.MatchCounts(k, *r["counts"][k]) for r in scored) if scored else None
            )
        for i, t in enumerate(self.iou_thresholds):
            c = pooled[t]
            out[f"f1@{_tkey(t)}"] = c.f1 if c else nan
            if i == 0 or self.extra_metrics:
                out[f"precision@{_tkey(t)}"] = c.precision if c else nan
                out[f"recall@{_tkey(t)}"] = c.recall if c else nan
                out[f"pq@{_tkey(t)}"] = c.pq if c else nan
        for key in ("dice", "jaccard", "pixel_accuracy"):
            out[key] = mean(key)
        if self.extra_metrics:
            out["n_splits"] = int(sum(r.get("n_splits", 0) for r in scored))
            out["n_merges"] = int(sum(r.get("n_merges", 0) for r in scored))
            out["n_images_scored"] = len(scored)
            out.update(self._size_metrics(scored))
        out["n_images"] = len(records)
        out["n_gt"] = int(sum(r["n_gt"] for r in records))
        out["n_pred"] = int(sum(r["n_pred"] for r in records))
        return out
