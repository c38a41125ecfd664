"""What the Mask R-CNN's design lets it reach on each source's nuclei, from the annotations alone.

    python bench/maskrcnn_limits.py [--data datasets/coco] [--sources bbbc038,sbsst265,monuseg] \
        [--experiment nuclei_maskrcnn] [--out bench/results/generalist/maskrcnn_limits]

Two ceilings that no amount of training lifts, per object size (equivalent diameter bins of
:func:`cellrcnn.evaluation.matching.size_bin_names`):

- **Anchors** (the region-proposal network): the share of annotated boxes whose best anchor
  reaches IoU 0.7 (the RPN's positive threshold) and 0.3 (below it an object gives the RPN no
  positive at all). Anchors are the experiment's ``anchor_sizes`` and ``aspect_ratios``, one size
  per FPN level and 1, 2 or 3 sizes per octave (``anchor_scales``), centred on that level's
  stride grid as torchvision places them. Measured on
  each source's *training* images at the size the mixed data module trains them
  (``target_diameter`` and ``rescale_strength``, without the random scale augmentation).
- **Mask head resolution and pasting**: every annotated mask of the *held-out* images cut to the
  mask head's 28×28 grid over its box (as torchvision builds the mask targets) and pasted back,
  by torchvision's ``paste_masks_in_image`` and by :func:`cellrcnn.models.maskrcnn.paste_masks`
  (which samples where the targets were cut): the IoU with the original is the best outline a
  perfect mask head can draw. The U-Net predicts at full resolution and has no such ceiling.

With ``--checkpoint`` (a trained Mask R-CNN), also what the pasting costs that model: its
detections on each source's held-out images (native size, one pass per image) pasted both ways,
at its calibrated mask threshold and at 0.5, scored by mean dsb_score and pq@0.5.

Results: ``<out>/maskrcnn_limits.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RPN_POSITIVE, RPN_NEGATIVE = 0.7, 0.3
MASK_SIDE = 28  # torchvision's mask head: RoIAlign 14×14, one 2× transposed convolution
ANCHOR_SCALES = (1, 2, 3)  # anchor sizes per octave compared


def anchor_grid(sizes: list[int], ratios: list[float], scales: int = 1) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(stride, anchor widths, anchor heights) per FPN level: strides 4, 8, ..., ``scales`` sizes
    per octave (``build_maskrcnn``'s ``anchor_scales``) and torchvision's shapes (height =
    size·sqrt(ratio), width = size/sqrt(ratio))."""
    r = np.sqrt(np.asarray(ratios, np.float64))
    grid = []
    for level, size in enumerate(sizes):
        per_octave = np.array([size * 2 ** (k / scales) for k in range(scales)])
        grid.append((4 * 2**level, (per_octave[:, None] / r).ravel(), (per_octave[:, None] * r).ravel()))
    return grid


def best_anchor_iou(boxes: np.ndarray, grid: list[tuple[int, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per xyxy box, the highest IoU of any anchor: per level the anchors centred on the four
    grid points around the box centre (anchor centres lie on multiples of the level's stride)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = np.zeros(len(boxes))
    for stride, widths, heights in grid:
        for gx in (np.floor(cx / stride), np.ceil(cx / stride)):
            for gy in (np.floor(cy / stride), np.ceil(cy / stride)):
                ax, ay = gx[:, None] * stride, gy[:, None] * stride
                ix = np.minimum(boxes[:, 2:3], ax + widths / 2) - np.maximum(boxes[:, 0:1], ax - widths / 2)
                iy = np.minimum(boxes[:, 3:4], ay + heights / 2) - np.maximum(boxes[:, 1:2], ay - heights / 2)
                inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
                iou = inter / (area[:, None] + widths * heights - inter)
                best = np.maximum(best, iou.max(axis=1))
    return best


PASTES = ("torchvision", "cellrcnn@0.5", "cellrcnn@0.4")  # mask pasting, and the probability threshold


def mask_head_iou(mask: np.ndarray, box, side: int = MASK_SIDE) -> dict[str, float]:
    """IoU of one H×W mask with itself after a round trip through a side×side grid over its xyxy
    box: cut as the mask head's training targets are (torchvision's ``project_masks_on_boxes``)
    and pasted back by torchvision's ``paste_masks_in_image`` and by cellrcnn's ``paste_masks``
    (computed inside the box and a margin: a full-size copy per object would not fit in memory)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

    from cellrcnn.models.maskrcnn import paste_masks

    h, w = mask.shape
    x0, y0 = max(int(box[0]) - 2, 0), max(int(box[1]) - 2, 0)
    x1, y1 = min(int(np.ceil(box[2])) + 2, w), min(int(np.ceil(box[3])) + 2, h)
    crop = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1], np.uint8))
    b = torch.tensor([[box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0]], dtype=torch.float32)
    target = project_masks_on_boxes(crop[None], b, torch.zeros(1, dtype=torch.int64), side)[:, None]
    pasted = {"torchvision": paste_masks_in_image(target, b, crop.shape)[0, 0] > 0.5,
              "cellrcnn@0.5": paste_masks(target, b, tuple(crop.shape), 0.5)[0].bool(),
              "cellrcnn@0.4": paste_masks(target, b, tuple(crop.shape), 0.4)[0].bool()}
    gt = crop.bool()
    return {k: float((v & gt).sum()) / max(float((v | gt).sum()), 1.0) for k, v in pasted.items()}


def torchvision_label_image(mask_probs: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                            size: tuple[int, int], threshold: float, chunk: int = 32) -> np.ndarray:
    """The label image of torchvision's ``paste_masks_in_image`` (overlaps to the higher score),
    pasted a chunk of detections at a time (all at once needs N full-frame float images)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    labels = np.zeros(size, np.int32)
    order = torch.argsort(scores, stable=True)  # paint low to high: the best ends on top
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        masks = (paste_masks_in_image(mask_probs[idx], boxes[idx], size)[:, 0] > threshold).numpy()
        for i, mask in zip(idx.tolist(), masks, strict=True):
            labels[mask] = i + 1
    return labels


def trained_model_pastes(data: Path, source: str, ckpt: Path) -> dict:
    """Mean dsb_score and pooled pq@0.5 of a trained Mask R-CNN's held-out predictions, its
    detections pasted by torchvision and by cellrcnn, at its mask threshold and at 0.5."""
    from cellrcnn.evaluation.matching import MatchCounts, dsb_score, match, pool
    from cellrcnn.inference.predictor import load_predictor
    from cellrcnn.io import prepare_image, read_image
    from cellrcnn.models.maskrcnn import detect, paste_label_image

    predictor = load_predictor(ckpt)
    thresholds = sorted({predictor.mask_threshold, 0.5})
    d = json.loads((data / source / "annotations" / "test.json").read_text())
    gts = dict(zip((im["id"] for im in d["images"]), _gt_label_images(d), strict=True))
    scores: dict[str, list[float]] = {}
    counts: dict[str, list[MatchCounts]] = {}
    for im in d["images"]:
        raw = read_image(data / source / "images" / Path(im["file_name"]).name)
        x = torch.from_numpy(prepare_image(raw, **predictor.input_settings))
        with torch.inference_mode():
            det = detect(predictor.net, [x], bf16=predictor.bf16)[0]
        size = tuple(x.shape[-2:])
        probs, boxes, det_scores = det["mask_probs"].float(), det["boxes"].float(), det["scores"].float()
        for t in thresholds:
            for paste, labels in (("torchvision", torchvision_label_image(probs, boxes, det_scores, size, t)),
                                  ("cellrcnn", paste_label_image(probs, boxes, det_scores, size, t))):
                key = f"{paste} paste, mask threshold {t:g}"
                scores.setdefault(key, []).append(dsb_score(gts[im["id"]], labels))
                counts.setdefault(key, []).append(match(gts[im["id"]], labels, 0.5).counts)
    return {key: {"dsb_score": round(float(np.mean(v)), 4), "pq@0.5": round(pool(counts[key]).pq, 4),
                  "images": len(v)} for key, v in scores.items()}


def _annotations_by_image(d: dict) -> dict[int, list]:
    """A COCO file's non-crowd annotations with a mask, per image id."""
    by_image: dict[int, list] = {}
    for a in d["annotations"]:
        if a.get("segmentation") and not a.get("iscrowd"):
            by_image.setdefault(a["image_id"], []).append(a)
    return by_image


def _gt_label_images(d: dict) -> list[np.ndarray]:
    from cellrcnn.data.masks import decode_segmentation

    by_image = _annotations_by_image(d)
    out = []
    for im in d["images"]:
        labels = np.zeros((im["height"], im["width"]), np.int32)
        for k, a in enumerate(by_image.get(im["id"], []), start=1):
            labels[decode_segmentation(a["segmentation"], im["height"], im["width"]) > 0] = k
        out.append(labels)
    return out


def size_bins(diameters: np.ndarray) -> np.ndarray:
    from cellrcnn.evaluation.matching import SIZE_EDGES

    return np.searchsorted(np.asarray(SIZE_EDGES), diameters, side="right") - 1


def source_images(data: Path, source: str, split: str):
    """Per image of a converted source's split: (boxes xyxy N×4, a function giving mask k as
    H×W bool, diameters N) of its objects with masks."""
    from cellrcnn.data.masks import decode_segmentation
    from cellrcnn.data.sizes import equivalent_diameter

    d = json.loads((data / source / "annotations" / f"{split}.json").read_text())
    by_image = _annotations_by_image(d)
    for im in d["images"]:
        anns = by_image.get(im["id"], [])
        if not anns:
            continue

        def mask(k: int, anns=anns, h=im["height"], w=im["width"]) -> np.ndarray:
            return decode_segmentation(anns[k]["segmentation"], h, w).astype(bool)

        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)], np.float64)
        yield boxes, mask, equivalent_diameter([a["area"] for a in anns])


def measure(data: Path, source: str, cfg) -> dict:
    from cellrcnn.data.mixed import resize_factors
    from cellrcnn.evaluation.matching import size_bin_names

    names = size_bin_names()
    grids = {scales: anchor_grid(list(cfg.model.net.anchor_sizes), list(cfg.model.net.aspect_ratios), scales)
             for scales in ANCHOR_SCALES}
    anchors = {scales: [[] for _ in names] for scales in ANCHOR_SCALES}
    for boxes, _, diameters in source_images(data, source, "train"):
        factor = float(resize_factors(np.array([np.median(diameters)]), cfg.data.target_diameter,
                                      cfg.data.rescale_strength, cfg.data.max_rescale)[0])
        bins = size_bins(diameters * factor)
        for scales, grid in grids.items():
            for k, b in zip(bins, best_anchor_iou(boxes * factor, grid), strict=True):
                anchors[scales][k].append(b)
    masks = [[] for _ in names]
    for boxes, mask, diameters in source_images(data, source, "test"):
        for i, k in enumerate(size_bins(diameters)):
            masks[k].append(mask_head_iou(mask(i), boxes[i]))
    out = {}
    for b, (name, m) in enumerate(zip(names, masks, strict=True)):
        row = {"train_objects": len(anchors[1][b])}
        for scales in ANCHOR_SCALES:
            a = np.array(anchors[scales][b])
            row[f"anchor_iou_0.7_scales{scales}"] = round(float(np.mean(a >= RPN_POSITIVE)), 3) if a.size else None
            row[f"anchor_iou_0.3_scales{scales}"] = round(float(np.mean(a >= RPN_NEGATIVE)), 3) if a.size else None
        row["test_objects"] = len(m)
        row.update({f"mask_iou_{k}": round(float(np.mean([r[k] for r in m])), 3) if m else None for k in PASTES})
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "datasets" / "coco")
    p.add_argument("--sources", default="bbbc038,sbsst265,monuseg")
    p.add_argument("--experiment", default="nuclei_maskrcnn", help="the anchors and resizing of this experiment")
    p.add_argument("--checkpoint", type=Path, help="a trained Mask R-CNN: also score its predictions pasted both ways")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generalist" / "maskrcnn_limits")
    args = p.parse_args(argv)

    import tempfile

    from cellrcnn.config import compose_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("train", [f"experiment={args.experiment}"], Path(tmp))
    results = {source: measure(args.data, source, cfg) for source in args.sources.split(",")
               if (args.data / source / "annotations").is_dir()}
    pastes = {source: trained_model_pastes(args.data, source, args.checkpoint) for source in results} \
        if args.checkpoint else {}
    command = "python bench/maskrcnn_limits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "maskrcnn_limits.json").write_text(json.dumps(
        {"command": command, "anchor_sizes": list(cfg.model.net.anchor_sizes),
         "aspect_ratios": list(cfg.model.net.aspect_ratios), "sources": results, "trained_model": pastes},
        indent=1) + "\n")
    lines = [f"# Mask R-CNN ceilings per object size (`{args.experiment}`)", "", f"Command: `{command}`", "",
             f"Anchors {list(cfg.model.net.anchor_sizes)} px, aspect ratios {list(cfg.model.net.aspect_ratios)}, "
             "1, 2 or 3 sizes per octave (`anchor_scales`). Anchor columns: training images at their training "
             f"size, share of objects whose best anchor reaches IoU {RPN_POSITIVE} / {RPN_NEGATIVE}. Mask column: held-out images, the mean IoU of each "
             f"annotated mask after a round trip through the {MASK_SIDE}×{MASK_SIDE} mask-head grid, pasted back by "
             "torchvision's `paste_masks_in_image` (threshold 0.5) or cellrcnn's `paste_masks` (0.5, 0.4).", "",
             "| source | size (px) | training objects | "
             + " | ".join(f"anchor IoU ≥ 0.7 / ≥ 0.3, {k} per octave" for k in ANCHOR_SCALES)
             + " | held-out objects | " + " | ".join(f"mask ceiling, {k} paste" for k in PASTES) + " |",
             "|" + "---|" * (4 + len(ANCHOR_SCALES) + len(PASTES))]
    for source, rows in results.items():
        for name, r in rows.items():
            cells = [str(r["train_objects"])]
            cells += [f"{r[f'anchor_iou_0.7_scales{k}']} / {r[f'anchor_iou_0.3_scales{k}']}"
                      if r["train_objects"] else "–" for k in ANCHOR_SCALES]
            cells += [str(r["test_objects"]), *("–" if r[f"mask_iou_{k}"] is None else str(r[f"mask_iou_{k}"])
                                                 for k in PASTES)]
            lines.append(f"| {source} | {name[1:]} | " + " | ".join(cells) + " |")
    if pastes:
        lines += ["", f"The trained model `{args.checkpoint}` on the held-out images (native size), its detections "
                  "pasted both ways: mean dsb_score / pq@0.5.", "", "| source | " + " | ".join(next(iter(pastes.values())))
                  + " |", "|" + "---|" * (1 + len(next(iter(pastes.values()))))]
        lines += [f"| {source} ({next(iter(r.values()))['images']}) | " + " | ".join(
            f"{v['dsb_score']} / {v['pq@0.5']}" for v in r.values()) + " |" for source, r in pastes.items()]
    (args.out / "maskrcnn_limits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
