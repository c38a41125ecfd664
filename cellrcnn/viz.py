"""Overlays of instance segmentations on images: per-object colours, and TP/FP/FN colouring.

TP/FP/FN colouring (one-to-one matching at IoU >= 0.5, :func:`cellrcnn.evaluation.matching.match`):

- true positive: predicted object matched to a ground-truth object — green fill and outline;
- false positive: predicted object without a match — magenta fill and outline;
- false negative: ground-truth object without a match — yellow outline (nothing was predicted there).

Green/magenta stay distinguishable for the common red-green colour-vision deficiencies.
All functions return H×W×3 uint8 RGB arrays; images are float C×H×W (or H×W) in about [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

TP_COLOR = (40, 220, 40)
FP_COLOR = (255, 0, 255)
FN_COLOR = (255, 220, 0)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_rgb(image) -> np.ndarray:
    """Float C×H×W / H×W / H×W×3 image in about [0, 1] -> H×W×3 uint8 (values clipped)."""
    image = _np(image).astype(np.float32)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def outlines(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """H×W bool: pixels of an object within ``width`` pixels of another label (inner boundaries)."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    pad = np.pad(labels, 1, mode="edge")
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dy : dy + labels.shape[0], dx : dx + labels.shape[1]] != labels
    edge &= labels > 0
    if width > 1:  # grown inwards only, so neighbouring objects keep their own colour
        from scipy.ndimage import grey_erosion

        inner = grey_erosion(labels, size=(2 * width + 1, 2 * width + 1), mode="nearest")
        grown = grey_erosion(-labels, size=(2 * width + 1, 2 * width + 1), mode="nearest")
        edge |= (labels > 0) & ((inner != labels) | (-grown != labels))
    return edge


def outline_width(shape: tuple[int, ...]) -> int:
    """Outline thickness in pixels that stays visible when an image is viewed whole: 1 px up to
    512 px, 2 px up to 1536 px, then one more per 1024 px of the shorter side."""
    return max(1, int(round(min(shape[:2]) / 1024 + 0.5)))


def bright_colors(n: int, seed: int = 0) -> np.ndarray:
    """(n + 1)×3 float32 RGB: fully saturated, full-value colours with hues between yellow and cyan
    (40-200°), spread by the golden ratio so neighbours differ. These stay readable on dark
    fluorescence backgrounds and on pink/purple H&E stains, where dark or magenta outlines vanish."""
    import colorsys

    start = np.random.default_rng(seed).random()
    hues = (40 + 160 * ((start + 0.618034 * np.arange(n + 1)) % 1.0)) / 360.0
    return np.asarray([colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in hues], np.float32) * 255


def _paint(rgb: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float, fill: np.ndarray,
           width: int = 1) -> None:
    """Blend ``colors[label]`` into ``rgb`` (in place): ``alpha`` inside filled objects, solid outlines."""
    inside = (labels > 0) & fill[labels]
    out = rgb.astype(np.float32)
    out[inside] = (1 - alpha) * out[inside] + alpha * colors[labels[inside]]
    edge = outlines(labels, width)
    out[edge] = colors[labels[edge]]
    rgb[...] = out.astype(np.uint8)


def overlay_labels(image, labels, alpha: float = 0.35, seed: int = 0, width: int | None = None) -> np.ndarray:
    """Each object of the H×W label image outlined in its own bright colour over ``image``
    (:func:`bright_colors`); ``width`` in pixels, by default :func:`outline_width` of the image."""
    labels = _np(labels).astype(np.int64)
    rgb = to_rgb(image)
    n = int(labels.max()) if labels.size else 0
    _paint(rgb, labels, bright_colors(n, seed), alpha, np.ones(n + 1, bool), width or outline_width(labels.shape))
    return rgb


def overlay_tp_fp_fn(image, gt_labels, pred_labels, iou_threshold: float = 0.5, alpha: float = 0.3) -> np.ndarray:
    """Predictions coloured TP (green) / FP (magenta) and missed GT outlined FN (yellow)."""
    from .evaluation.matching import match

    gt = _np(gt_labels).astype(np.int64)
    pred = _np(pred_labels).astype(np.int64)
    m = match(gt, pred, iou_threshold)
    rgb = to_rgb(image)
    pred_colors = np.tile(np.asarray(FP_COLOR, np.float32), (int(pred.max(initial=0)) + 1, 1))
    pred_colors[m.pred_ids] = TP_COLOR
    _paint(rgb, pred, pred_colors, alpha, np.ones(len(pred_colors), bool))
    missed = gt.copy()
    missed[np.isin(gt, m.gt_ids)] = 0
    gt_colors = np.tile(np.asarray(FN_COLOR, np.float32), (int(gt.max(initial=0)) + 1, 1))
    _paint(rgb, missed, gt_colors, 0.0, np.zeros(len(gt_colors), bool))
    return rgb


def grid(tiles: Sequence[np.ndarray], ncols: int = 4, pad: int = 4) -> np.ndarray:
    """H×W×3 uint8 tiles of any sizes -> one uint8 mosaic, row-major, black padding."""
    if not tiles:
        raise ValueError("grid needs at least one tile")
    ncols = max(1, min(ncols, len(tiles)))
    nrows = -(-len(tiles) // ncols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    out = np.zeros((nrows * (th + pad) + pad, ncols * (tw + pad) + pad, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        out[y : y + t.shape[0], x : x + t.shape[1]] = t
    return out


def tp_fp_fn_grid(samples: Sequence[tuple], ncols: int = 4, iou_threshold: float = 0.5) -> np.ndarray:
    """Mosaic of TP/FP/FN overlays for ``(image, target, prediction)`` triples (masks N×H×W)."""
    from .data.masks import masks_to_label_image

    tiles = []
    for image, target, pred in samples:
        gt = masks_to_label_image(_np(target["masks"]).astype(bool))
        scores = _np(pred["scores"]) if "scores" in pred else None
        pr = masks_to_label_image(_np(pred["masks"]).astype(bool), scores)
        tiles.append(overlay_tp_fp_fn(image, gt, pr, iou_threshold))
    return grid(tiles, ncols)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an H×W×3 uint8 array as PNG (parent folders created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)
    return path
