"""Choose a trained model's decision thresholds on annotated images, and store them in its checkpoint.

    python -m cellrcnn.evaluation.calibrate CKPT ANNOTATIONS.json [--images DIR] [--limit 48]
                                            [--out CALIBRATED.ckpt]

A network's raw outputs are decided into objects by thresholds that training does not learn:
for Mask R-CNN the detection ``score_threshold`` (false positives cost as much as misses in the
DSB score) and the ``mask_threshold`` (how far a mask reaches); for the U-Net the foreground
probability ``fg_threshold``, the watershed seed depth ``h`` and the weight of the boundary class
in the watershed landscape ``boundary_weight`` (both: split versus merge), the object score
``min_score`` (mean foreground probability) and whether to average over flips (``tta``).
Their best values move with the length of training, so they are chosen after it: each image
runs through the network once (the U-Net also flip-averaged), every grid point is decided from
the same outputs, and the point with the best mean DSB score wins. Use annotated images that are
*not* the test split (e.g. part of the training set).

Writes the checkpoint copy (``--out``, default ``<ckpt>.calibrated.ckpt``) whose hyper-parameters
carry the chosen values, so ``predict.py``/``evaluate.py`` use them, and prints the grid.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.masks import masks_to_label_image
from ..models.maskrcnn import paste_label_image
from .matching import dsb_score

SCORE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MASK_GRID = (0.4, 0.5, 0.6, 0.7)
FG_GRID = (0.4, 0.5, 0.6, 0.7)
H_GRID = (0.02, 0.05, 0.1, 0.2)
MIN_SCORE_GRID = (0.0, 0.8, 0.85, 0.9)
BOUNDARY_GRID = (0.0, 0.5, 1.0)


def _gt_labels(target: dict) -> np.ndarray:
    masks = target["masks"].numpy()
    return masks_to_label_image(masks) if len(masks) else np.zeros(masks.shape[1:], np.int64)


def grid_maskrcnn(
    module, samples: Iterable[tuple[torch.Tensor, dict]], scores: Sequence[float] = SCORE_GRID,
    masks: Sequence[float] = MASK_GRID,
) -> dict[tuple[float, float], float]:
    """Mean DSB score per ``(score_threshold, mask_threshold)`` of a MaskRCNNModule."""
    saved = module.score_threshold
    module.score_threshold = min(scores)  # one pass decides every point
    totals = dict.fromkeys(itertools.product(scores, masks), 0.0)
    n = 0
    try:
        for image, target in tqdm(samples, desc="calibration", leave=False):
            gt = _gt_labels(target)
            det = module.detect([image])[0]
            det_scores = det["scores"].float().cpu()
            for mask_t in masks:
                labels = paste_label_image(det["mask_probs"], det["boxes"], det_scores, tuple(image.shape[-2:]), mask_t)
                for score_t in scores:  # each pixel holds its best detection: mask out the weaker ones
                    kept = np.concatenate([[False], det_scores.numpy() >= score_t])
                    totals[score_t, mask_t] += dsb_score(gt, labels * kept[labels])
            n += 1
    finally:
        module.score_threshold = saved
    return {k: v / max(n, 1) for k, v in totals.items()}


def grid_unet(
    module,
    samples: Iterable[tuple[torch.Tensor, dict]],
    tta: Sequence[bool] = (False, True),
    fg: Sequence[float] = FG_GRID,
    h: Sequence[float] = H_GRID,
    min_score: Sequence[float] = MIN_SCORE_GRID,
    boundary_weight: Sequence[float] = BOUNDARY_GRID,
) -> dict[tuple[bool, float, float, float, float], float]:
    """Mean DSB score per ``(tta, fg_threshold, h, min_score, boundary_weight)`` of a UNetModule's
    inference and watershed (one watershed per (tta, fg, h, boundary_weight); the score filter is
    applied to its result)."""
    from ..models.postprocess import drop_low_scores, unet_outputs_to_labels

    totals = dict.fromkeys(itertools.product(tta, fg, h, min_score, boundary_weight), 0.0)
    n = 0
    for image, target in tqdm(samples, desc="calibration", leave=False):
        gt = _gt_labels(target)
        maps = {flag: module.predict_maps(image, tta=flag) for flag in tta}
        for tta_t, fg_t, h_t, bw in itertools.product(tta, fg, h, boundary_weight):
            settings = {**module.postprocess, "fg_threshold": fg_t, "h": h_t, "boundary_weight": bw,
                        "seed_method": "hmaxima", "min_score": 0.0}
            labels, scores = unet_outputs_to_labels(*maps[tta_t], **settings)
            for score_t in min_score:
                totals[tta_t, fg_t, h_t, score_t, bw] += dsb_score(gt, drop_low_scores(labels, scores, score_t)[0])
        n += 1
    return {k: v / max(n, 1) for k, v in totals.items()}


def calibrate(module, samples: Sequence[tuple[torch.Tensor, dict]]) -> tuple[dict[str, Any], dict]:
    """Best thresholds of ``module`` on ``samples``; returns (hyper-parameter update, grid report).

    The update is applied to ``module`` too. The report holds the grid, the chosen point and the
    DSB score of the module's previous setting, so the gain can be read off."""
    from ..modules.maskrcnn_module import MaskRCNNModule
    from ..modules.unet_module import UNetModule

    if isinstance(module, MaskRCNNModule):
        names = ("score_threshold", "mask_threshold")
        before = (module.score_threshold, module.mask_threshold)
        grid = grid_maskrcnn(module, samples, sorted({*SCORE_GRID, before[0]}), sorted({*MASK_GRID, before[1]}))
    elif isinstance(module, UNetModule):
        names = ("tta", "fg_threshold", "h", "min_score", "boundary_weight")
        pp = module.postprocess
        before = (module.tta, pp.get("fg_threshold", 0.6), pp.get("h", 0.05), pp.get("min_score", 0.0),
                  pp.get("boundary_weight", 0.0))
        grid = grid_unet(module, samples, (False, True), *(sorted({*values, b}) for values, b in zip(
            (FG_GRID, H_GRID, MIN_SCORE_GRID, BOUNDARY_GRID), before[1:], strict=True)))
    else:
        raise TypeError(f"no thresholds to calibrate for {type(module).__name__}")
    best = max(grid, key=grid.get)
    chosen = dict(zip(names, best, strict=True))
    if isinstance(module, MaskRCNNModule):
        update = dict(chosen)
        module.score_threshold = chosen["score_threshold"]
        module.mask_threshold = chosen["mask_threshold"]
    else:
        module.tta = chosen.pop("tta")
        module.postprocess = {**module.postprocess, **chosen, "seed_method": "hmaxima"}
        update = {"postprocess": module.postprocess, "tta": module.tta}
        chosen = {"tta": module.tta, **chosen}
    report = {
        "parameters": list(names), "n_images": len(samples), "chosen": chosen, "dsb_score": grid[best],
        "previous": dict(zip(names, before, strict=True)), "previous_dsb_score": grid.get(before),
        "grid": [{**dict(zip(names, k, strict=True)), "dsb_score": v} for k, v in sorted(grid.items())],
    }  # fmt: skip
    return update, report


def write_calibrated(ckpt: Path, update: dict[str, Any], report: dict, out: Path) -> Path:
    """Copy ``ckpt`` to ``out`` with ``update`` merged into its hyper-parameters (and the report kept)."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"] = {**checkpoint.get("hyper_parameters", {}), **update}
    checkpoint["cellrcnn_calibration"] = report
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def pick_images(n_total: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(n_total)`` (all when ``limit`` is None or larger)."""
    if not limit or limit >= n_total:
        return list(range(n_total))
    return sorted({int(i) for i in np.linspace(0, n_total - 1, limit)})


def load_samples(annotations: Path, image_root: Path, limit: int | None, channels: int = 3,
                 invert_bright: bool = False) -> list[tuple[torch.Tensor, dict]]:
    """Up to ``limit`` (image, target) pairs spread over a COCO file, full size, prepared as the
    model sees them (``channels``, ``invert_bright``: see ``cellrcnn.evaluate.input_settings``)."""
    from ..data.coco import CocoInstanceDataset

    dataset = CocoInstanceDataset(annotations, image_root=image_root, channels=channels, invert_bright=invert_bright)
    return [dataset[i] for i in tqdm(pick_images(len(dataset), limit), desc="loading", leave=False)]


def main(argv: list[str] | None = None) -> None:
    from ..evaluate import input_settings
    from ..modules.base import load_module

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path, help="a cellrcnn checkpoint")
    p.add_argument("annotations", type=Path, help="COCO annotation file of the calibration images (not the test split)")
    p.add_argument("--images", type=Path, default=None, help="image folder (default: ../images next to the file)")
    p.add_argument("--limit", type=int, default=48, help="images used, spread over the file (default 48)")
    p.add_argument("--out", type=Path, default=None, help="calibrated checkpoint (default <ckpt>.calibrated.ckpt)")
    args = p.parse_args(argv)
    module = load_module(args.ckpt)
    image_root = args.images or args.annotations.resolve().parent.parent / "images"
    samples = load_samples(args.annotations, image_root, args.limit, **input_settings(module))
    if not samples:
        raise SystemExit(f"{args.annotations}: no images to calibrate on")
    update, report = calibrate(module, samples)
    out = args.out or args.ckpt.with_suffix(".calibrated.ckpt")
    write_calibrated(args.ckpt, update, report, out)
    print(json.dumps({k: v for k, v in report.items() if k != "grid"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
