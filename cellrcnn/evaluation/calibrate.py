"""Choose a trained model's decision thresholds on annotated images (as StarDist optimises its
thresholds after training).

A network's raw outputs are decided into objects by thresholds that training does not learn
(for Mask R-CNN the detection score and mask probability; for the U-Net the foreground
probability, the watershed seed depth and boundary weight, the object score and flip
averaging). Their best values move with the length of training, so they are chosen after it:
every grid point is decided from the same network outputs and the point with the best mean DSB
score wins. Use annotated images that are *not* the test split.

This module only searches and scores; each model owns its grid and how a grid point becomes a
label image, through three methods (see ``MaskRCNNModule`` and ``UNetModule``):

- ``threshold_values() -> {name: value}``: the current setting;
- ``threshold_grid() -> {name: [values]}``: the values tried (the current ones among them);
- ``label_images_over_grid(image, grid)``: yields ``(point, H×W label image)`` for every point of
  the product of the grid's values, in the grid's name order;
- ``apply_thresholds({name: value}) -> dict``: sets them, returns the hyper-parameter update.

The command line (``cellrcnn calibrate CKPT ANNOTATIONS.json``) is :mod:`cellrcnn.calibrate`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.masks import masks_to_label_image
from .matching import dsb_score

MIN_IMAGES = 4  # a time limit never cuts the calibration below this many images


def _gt_labels(target: dict) -> np.ndarray:
    masks = target["masks"].numpy()
    return masks_to_label_image(masks) if len(masks) else np.zeros(masks.shape[1:], np.int64)


def at_prediction_size(module, image: torch.Tensor, gt: np.ndarray) -> tuple[torch.Tensor, np.ndarray, float]:
    """``image`` and its ground-truth labels ``gt`` resized as ``predict.py diameter=default``
    resizes the image for ``module`` (its ``shrink`` or ``auto`` mode and training object size),
    judged from the annotated objects' median diameter, which the measuring pass of prediction
    finds about the same; also the factor. Thresholds are chosen on what the watershed will see:
    MoNuSeg's nuclei reach ``nuclei_he`` at 0.7 of their size, S-BSST265's reach ``nuclei`` at 0.3."""
    from ..inference.scale import (
        MODES,
        median_diameter,
        mode_factor,
        resize_image,
        resize_labels,
        resolve_diameter,
    )

    mode = resolve_diameter("default", getattr(module, "default_diameter", None))
    model_diameter = getattr(module, "object_diameter", None)
    if mode not in MODES or not model_diameter:
        return image, gt, 1.0
    factor = mode_factor(mode, median_diameter(gt), model_diameter, getattr(module, "training_profile", None))
    if factor == 1.0:
        return image, gt, 1.0
    image = torch.from_numpy(resize_image(image.permute(1, 2, 0).numpy(), factor)).permute(2, 0, 1)
    labels, _ = resize_labels(gt, np.ones(int(gt.max())), tuple(image.shape[-2:]))
    return image, labels, factor


def calibrate(
    module, samples: Iterable[tuple[torch.Tensor, dict]], deadline: float | None = None, min_images: int = MIN_IMAGES,
) -> tuple[dict[str, Any], dict]:
    """Best thresholds of ``module`` on ``samples`` (image C×H×W, target with ``masks`` N×H×W);
    returns (hyper-parameter update, grid report).

    Each image is first brought to the size prediction gives it (:func:`at_prediction_size`).
    ``deadline`` (a :func:`time.monotonic` value) stops taking further images once passed, after
    at least ``min_images``, so a calibration fits a time budget. The update is applied to
    ``module`` too. The report holds the grid, the chosen point and the DSB score of the module's
    previous setting, so the gain can be read off."""
    if not hasattr(module, "threshold_grid"):
        raise TypeError(f"no thresholds to calibrate for {type(module).__name__}")
    grid = module.threshold_grid()
    names = tuple(grid)
    before = tuple(module.threshold_values()[name] for name in names)
    totals = dict.fromkeys(itertools.product(*grid.values()), 0.0)
    n, resized = 0, 0
    for image, target in tqdm(samples, desc="calibration", leave=False):
        if deadline is not None and n >= min_images and time.monotonic() > deadline:
            break
        image, gt, factor = at_prediction_size(module, image, _gt_labels(target))
        resized += factor != 1.0
        for point, labels in module.label_images_over_grid(image, grid):
            totals[point] += dsb_score(gt, labels)
        n += 1
    scores = {k: v / max(n, 1) for k, v in totals.items()}
    best = max(scores, key=scores.get)  # ties: the first point in grid order
    chosen = dict(zip(names, best, strict=True))
    update = module.apply_thresholds(chosen)
    report = {
        "parameters": list(names), "n_images": n, "resized_images": resized, "chosen": chosen, "dsb_score": scores[best],
        "previous": dict(zip(names, before, strict=True)), "previous_dsb_score": scores.get(before),
        "grid": [{**dict(zip(names, k, strict=True)), "dsb_score": v} for k, v in sorted(scores.items())],
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


class CalibrationSamples:
    """Up to ``limit`` (image, target) pairs spread over one or more COCO files, full size, prepared
    as the model sees them (``channels``, ``invert_bright``, ``hematoxylin``: a module's
    ``input_settings``); read one at a time as :func:`calibrate` takes them, so a calibration
    stopped by its deadline reads no more.

    ``image_root``: the image folder, or None for ``../images`` next to each file. ``modality``
    (one of :data:`cellrcnn.data.appearance.MODALITIES`): keep only images of that appearance,
    e.g. ``"H&E"`` for a model that ``model=auto`` gives stained tissue to.
    """

    def __init__(self, annotations: Path | Sequence[Path], image_root: Path | None, limit: int | None,
                 channels: int = 3, invert_bright: bool = False, hematoxylin: bool = False,
                 modality: str | None = None) -> None:
        from ..data.appearance import MODALITIES
        from ..data.appearance import modality as modality_of
        from ..data.coco import CocoInstanceDataset

        if modality is not None and modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        files = [Path(annotations)] if isinstance(annotations, (str, Path)) else [Path(a) for a in annotations]
        self.datasets = [CocoInstanceDataset(f, image_root=image_root, channels=channels,
                                             invert_bright=invert_bright, hematoxylin=hematoxylin) for f in files]
        candidates = [(d, i) for d, dataset in enumerate(self.datasets) for i in range(len(dataset))
                      if modality is None or modality_of(dataset.load_raw(i)) == modality]
        self.items = [candidates[k] for k in pick_images(len(candidates), limit)]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return (self.datasets[d][i] for d, i in self.items)


def load_samples(annotations: Path, image_root: Path, limit: int | None, channels: int = 3,
                 invert_bright: bool = False, hematoxylin: bool = False) -> list[tuple[torch.Tensor, dict]]:
    """:class:`CalibrationSamples` read into a list at once."""
    samples = CalibrationSamples(annotations, image_root, limit, channels, invert_bright, hematoxylin)
    return list(tqdm(samples, desc="loading", leave=False))
