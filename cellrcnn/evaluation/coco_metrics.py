"""COCO average precision (pycocotools) with limits that suit crowded cell images.

Differences from the stock COCO settings, and why:

- ``max_dets`` defaults to ``(1, 100, 3000)`` and every AP is read at the largest value. The stock
  100 detections per image silently truncates a crowded field (a 1000×1000 tile of nuclei
  easily holds 500–2000 objects), capping recall and AP. A warning is raised when an image has
  more detections than the limit.
- Area ranges (pixels²): small < 16², medium 16²–48², large > 48². COCO's 32² / 96² split puts
  nearly every nucleus (10–30 px across, 80–700 px²) into "small" and leaves "large" empty, so the
  size breakdown says nothing; 16² / 48² separates small nuclei, typical nuclei/small cells, and
  large cells.
- ``summarize()`` hardcodes maxDets indices and prints; the numbers here are read directly from
  ``COCOeval.eval['precision']`` at the largest ``max_dets`` and pycocotools' prints are silenced.
- ``COCOeval.evaluateImg`` loops over every (detection, GT) pair in Python (minutes for 1500
  objects); :class:`FastCOCOeval` visits only pairs whose IoU can reach the threshold and returns
  exactly the same per-image records.

Empty cases: no GT object of a type anywhere -> that type's APs are ``nan`` (undefined, not 0);
GT present but no detections -> 0.0. Box-only GT (``rle is None``) counts fully for bbox AP;
for segm AP it is an ignore region (``iscrowd=1`` box rectangle), so a detection on it is neither
a true nor a false positive.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data.masks import object_slices

DEFAULT_MAX_DETS: tuple[int, ...] = (1, 100, 3000)
#: name -> [min, max] object area in pixels²
CELL_AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e10),
    "small": (0.0, 16.0**2),
    "medium": (16.0**2, 48.0**2),
    "large": (48.0**2, 1e10),
}


@dataclass
class CocoImage:
    """Instances of one image for COCO evaluation.

    Boxes are float N×4 ``x, y, w, h`` in pixels (COCO order); RLEs are compressed COCO RLE dicts
    (``None`` in ``gt_rles`` marks a box-only GT object). ``dt_rles`` may be None for box-only models.
    """

    height: int
    width: int
    gt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    gt_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    gt_rles: list = field(default_factory=list)
    dt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    dt_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dt_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dt_rles: list | None = field(default_factory=list)


def masks_to_rles(masks: np.ndarray, chunk: int = 64) -> list[dict]:
    """N×H×W binary masks -> N compressed RLE dicts (encoded in chunks to bound memory)."""
    masks = np.asarray(masks)
    out: list[dict] = []
    for s in range(0, len(masks), chunk):
        block = np.asfortranarray(np.moveaxis((masks[s : s + chunk] > 0).astype(np.uint8), 0, -1))
        out.extend(mask_utils.encode(block))
    return out


def label_image_to_rles(labels: np.ndarray, chunk: int = 64) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Label image -> (RLE per object, label ids N, boxes N×4 xywh); never holds N full masks at once."""
    ids, compact, slices = object_slices(labels)
    rles: list[dict] = []
    boxes = np.zeros((ids.size, 4))
    for s in range(0, ids.size, chunk):
        block = np.zeros((compact.shape[0], compact.shape[1], min(chunk, ids.size - s)), np.uint8, order="F")
        for j in range(block.shape[2]):
            sl = slices[s + j]
            block[sl[0], sl[1], j] = compact[sl] == s + j + 1
            boxes[s + j] = (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
        rles.extend(mask_utils.encode(block))
    return rles, ids, boxes


class FastCOCOeval(COCOeval):
    """COCOeval whose per-image greedy matching skips pairs below the lowest IoU threshold.

    Same greedy rule as pycocotools (detections by descending score; best-IoU unmatched GT with
    IoU >= t, non-ignored GT preferred, ties to the later GT), same output records.
    """

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802 (pycocotools name)
        p = self.params
        gt = self._gts[imgId, catId]
        dt = self._dts[imgId, catId]
        if len(gt) == 0 and len(dt) == 0:
            return None
        for g in gt:
            g["_ignore"] = int(bool(g["ignore"]) or g["area"] < aRng[0] or g["area"] > aRng[1])
        gtind = np.argsort([g["_ignore"] for g in gt], kind="mergesort")
        gt = [gt[i] for i in gtind]
        dtind = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in dtind[0:maxDet]]
        iscrowd = np.array([int(o["iscrowd"]) for o in gt], bool)
        ious = self.ious[imgId, catId]
        ious = ious[:, gtind] if len(ious) > 0 else ious
        T, G, D = len(p.iouThrs), len(gt), len(dt)
        gtm, dtm, dtIg = np.zeros((T, G)), np.zeros((T, D)), np.zeros((T, D))
        gtIg = np.array([g["_ignore"] for g in gt])
        if len(ious) and D and G:
            floor = min(min(p.iouThrs), 1 - 1e-10)
            cand_d, cand_g = np.nonzero(ious[:D] >= floor)  # row-major: GT order kept per detection
            starts = np.searchsorted(cand_d, np.arange(D + 1))
            gt_ids = [g["id"] for g in gt]
            for tind, t in enumerate(p.iouThrs):
                for dind in range(D):
                    iou, m = min(t, 1 - 1e-10), -1
                    for gind in cand_g[starts[dind] : starts[dind + 1]]:
                        if gtm[tind, gind] > 0 and not iscrowd[gind]:
                            continue
                        if m > -1 and gtIg[m] == 0 and gtIg[gind] == 1:
                            break
                        if ious[dind, gind] < iou:
                            continue
                        iou, m = ious[dind, gind], gind
                    if m == -1:
                        continue
                    dtIg[tind, dind] = gtIg[m]
                    dtm[tind, dind] = gt_ids[m]
                    gtm[tind, m] = dt[dind]["id"]
        a = np.array([d["area"] < aRng[0] or d["area"] > aRng[1] for d in dt]).reshape((1, len(dt)))
        dtIg = np.logical_or(dtIg, np.logical_and(dtm == 0, np.repeat(a, T, 0)))
        return {
            "image_id": imgId,
            "category_id": catId,
            "aRng": aRng,
            "maxDet": maxDet,
            "dtIds": [d["id"] for d in dt],
            "gtIds": [g["id"] for g in gt],
            "dtMatches": dtm,
            "gtMatches": gtm,
            "dtScores": [d["score"] for d in dt],
            "gtIgnore": gtIg,
            "dtIgnore": dtIg,
        }


def _box_rle(box: Sequence[float], h: int, w: int) -> dict:
    return mask_utils.frPyObjects(np.asarray([box], np.float64).reshape(1, 4), h, w)[0]


def _build(images: Sequence[CocoImage], iou_type: str) -> tuple[COCO, COCO, list[int], bool]:
    """In-memory GT and detection COCO objects; also the category ids and whether scorable GT exists."""
    img_list, gts, dts = [], [], []
    cats: set[int] = set()
    has_gt = False
    for img_id, im in enumerate(images, start=1):
        img_list.append({"id": img_id, "height": int(im.height), "width": int(im.width)})
        for box, lab, rle in zip(
            np.asarray(im.gt_boxes).reshape(-1, 4), im.gt_labels, im.gt_rles, strict=True
        ):
            ann = {
                "id": len(gts) + 1,
                "image_id": img_id,
                "category_id": int(lab),
                "bbox": [float(v) for v in box],
            }
            cats.add(int(lab))
            if iou_type == "bbox":
                ann.update(area=float(box[2] * box[3]), iscrowd=0)
            elif rle is None:  # box-only object: ignore region for segm
                ann.update(
                    segmentation=_box_rle(box, im.height, im.width), area=float(box[2] * box[3]), iscrowd=1
                )
            else:
                ann.update(segmentation=rle, area=float(mask_utils.area(rle)), iscrowd=0)
            has_gt |= ann["iscrowd"] == 0
            gts.append(ann)
        if iou_type == "segm" and im.dt_rles is None:
            continue
        rles = im.dt_rles if iou_type == "segm" else [None] * len(im.dt_scores)
        for box, lab, score, rle in zip(
            np.asarray(im.dt_boxes).reshape(-1, 4), im.dt_labels, im.dt_scores, rles, strict=True
        ):
            ann = {
                "id": len(dts) + 1,
                "image_id": img_id,
                "category_id": int(lab),
                "score": float(score),
                "iscrowd": 0,
            }
            if iou_type == "bbox":
                ann.update(bbox=[float(v) for v in box], area=float(box[2] * box[3]))
            else:
                ann.update(
                    segmentation=rle, area=float(mask_utils.area(rle)), bbox=list(mask_utils.toBbox(rle))
                )
            dts.append(ann)
    cat_ids = sorted(cats | {int(d["category_id"]) for d in dts}) or [1]
    categories = [{"id": c, "name": str(c)} for c in cat_ids]
    coco_gt, coco_dt = COCO(), COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.dataset = {"images": img_list, "annotations": gts, "categories": categories}
        coco_gt.createIndex()
        coco_dt.dataset = {"images": img_list, "annotations": dts, "categories": categories}
        coco_dt.createIndex()
    return coco_gt, coco_dt, cat_ids, has_gt


def _ap(precision: np.ndarray, t_index: int | None = None, area_index: int = 0) -> float:
    """Mean precision over recall points (and categories, IoUs) at the largest maxDets; nan if no GT."""
    p = precision[:, :, :, area_index, -1]
    if t_index is not None:
        p = p[t_index]
    p = p[p > -1]
    return float(np.mean(p)) if p.size else float("nan")


def evaluate_coco(
    images: Sequence[CocoImage],
    iou_type: str = "segm",
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    area_ranges: dict[str, tuple[float, float]] | None = None,
) -> dict[str, float]:
    """COCO AP of one ``iou_type`` ("segm" or "bbox") over a set of images.

    Returns ``{prefix}_AP`` (mean over IoU 0.50:0.05:0.95), ``_AP50``, ``_AP75`` and ``_AP_<range>``
    for every area range except "all", with ``prefix`` = ``iou_type``. All values at ``max(max_dets)``.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    ranges = dict(area_ranges or CELL_AREA_RANGES)
    if "all" not in ranges:
        ranges = {"all": (0.0, 1e10), **ranges}
    ranges = {"all": ranges.pop("all"), **ranges}  # "all" must be index 0
    keys = ["AP", "AP50", "AP75"] + [f"AP_{n}" for n in ranges if n != "all"]
    nan = {f"{iou_type}_{k}": float("nan") for k in keys}
    max_dets = sorted(int(m) for m in max_dets)
    n_over = sum(len(im.dt_scores) > max_dets[-1] for im in images)
    if n_over:
        warnings.warn(
            f"{n_over} image(s) have more than {max_dets[-1]} detections; COCO AP keeps only the top-scoring ones",
            stacklevel=2,
        )
    if not images:
        return nan
    coco_gt, coco_dt, cat_ids, has_gt = _build(images, iou_type)
    if not has_gt:
        return nan
    ev = FastCOCOeval(coco_gt, coco_dt, iou_type)
    ev.params.imgIds = sorted(coco_gt.getImgIds())
    ev.params.catIds = cat_ids
    ev.params.maxDets = max_dets
    ev.params.areaRng = [list(r) for r in ranges.values()]
    ev.params.areaRngLbl = list(ranges)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"]  # T×R×K×A×M, -1 where a category has no GT
    iou_thrs = np.asarray(ev.params.iouThrs)
    out = {
        f"{iou_type}_AP": _ap(prec),
        f"{iou_type}_AP50": _ap(prec, int(np.argmin(np.abs(iou_thrs - 0.5)))),
        f"{iou_type}_AP75": _ap(prec, int(np.argmin(np.abs(iou_thrs - 0.75)))),
    }
    for a, name in enumerate(ranges):
        if name != "all":
            out[f"{iou_type}_AP_{name}"] = _ap(prec, area_index=a)
    return out
