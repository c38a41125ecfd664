"""Prediction on images larger than a model input: overlapping tiles, seam-correct merging.

Whole-slide and stitched fields (4096×4096 px and more, 16-bit, several channels) do not fit a
detector at once, and a detector's N×H×W masks over the whole image would need N times the image
memory. :func:`predict_tiled` runs any ``predict_fn`` tile by tile and writes the objects into one
uint32 label image, so peak memory grows with the tile size, not with the image size.

Merging rule (each object comes out exactly once and whole):

1. Tiles of ``tile_size`` overlap their neighbours by at least ``overlap`` pixels; the last tile of
   a row or column is aligned with the image edge (it then overlaps more).
2. Each tile *owns* the part of the image closer to its centre than to a neighbour's: the owned
   region ends half-way through each overlap, and reaches the image border where the tile does.
3. A tile keeps an object when the object's box centre lies in the owned region (widened by a few
   pixels, ``seam_tolerance``, so that a model whose masks shift by a pixel between tiles does
   not drop an object lying on the boundary) and the object does not touch an inner tile edge
   (an edge that is not the image border: such an object is cut, and a neighbour sees it whole).
4. Objects are pasted into the label image in tile order. An object covering more than half of
   an object kept by another tile is the same object seen twice (only possible inside the
   tolerance band): the higher score stays. Otherwise pixels claimed by two objects go to the
   higher score, as when painting one image's masks (:func:`masks_to_label_image`).

Assumption: ``overlap`` exceeds the largest object's diameter (box width and height). Then an
object whose centre a tile owns lies wholly inside that tile (the owned region stops at least
overlap/2 from an inner edge), so it is never lost or cut. Larger objects are dropped with a
warning naming how many, asking for a larger overlap.

Intensity normalisation must be the same for every tile, so it happens once for the whole image:
a float image is taken as already normalised; an integer (raw 8/16-bit) image is scaled per tile
with the 1st/99.8th percentiles of a strided subsample of the whole image (the same rule as
:func:`cellrcnn.io.normalize_percentile`, without a float copy of the full image; colour converted
to grey for a 1-channel model is averaged after scaling, so it can differ slightly from
``prepare_image``, which averages first).

Memory: the raw image, the uint32 label image (4 bytes/pixel) and one tile's prediction: a label
image (the shipped predictors, :mod:`cellrcnn.inference.predictor`), or for a ``predict_fn`` that
returns N×h×w masks ~N MB per 1024² tile, which dominates for dense fields: prefer 512-px tiles
there (see ``bench/tiled_predict.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from cellrcnn.io import NORMALISED_LIMIT, check_polarity
from cellrcnn.models.postprocess import _numpy, labels_to_instances

PredictFn = Callable[[list[torch.Tensor]], list[dict]]

DUPLICATE_FRACTION = 0.5  # an overlap above this share of the smaller object means "same object"


class TiledPrediction(NamedTuple):
    """Result of :func:`predict_tiled`; unpacks as ``labels, scores = predict_tiled(...)``."""

    labels: np.ndarray  # uint32 H×W, 0 = background, objects 1..N
    scores: np.ndarray  # float32 N, scores[k - 1] belongs to label k


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis; consecutive tiles overlap by >= ``overlap`` px."""
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size, tile_size - overlap))
    starts.append(length - tile_size)  # last tile flush with the edge, so no tile is padded
    return starts


def owned_ranges(starts: list[int], tile_size: int, length: int) -> list[tuple[float, float]]:
    """Half-open [lo, hi) range each tile owns along one axis: up to the middle of each overlap."""
    mids = [(nxt + cur + tile_size) / 2.0 for cur, nxt in zip(starts[:-1], starts[1:], strict=True)]
    return list(zip([0.0, *mids], [*mids, float(length)], strict=True))


def subsample(image: np.ndarray, max_samples: int = 1 << 22) -> np.ndarray:
    """Float32 strided view of a C×H×W image with at most ``max_samples`` pixels per channel."""
    h, w = image.shape[-2:]
    step = max(1, int(np.ceil(np.sqrt(h * w / max_samples))))
    return np.asarray(image[..., ::step, ::step], dtype=np.float32)


def estimate_percentiles(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, max_samples: int = 1 << 22
) -> tuple[float, float]:
    """Low/high intensity percentiles of a C×H×W image from a strided subsample (all channels).

    ``max_samples`` pixels per channel at most, so a 16k×16k image costs a few MB, not a float
    copy of the whole image. A flat image gets a unit range, as in ``normalize_percentile``.
    """
    sample = subsample(image, max_samples)
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN/inf pixels (an array given directly): ignored
        finite = sample[np.isfinite(sample)]
        lo, hi = (float(v) for v in np.percentile(finite, [low, high])) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-6:
        hi = lo + max(1.0, abs(lo))
    return lo, hi


def _as_chw(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"predict_tiled expects a C×H×W (or H×W) image, got shape {image.shape}")
    return image


def _tile_tensor(image: np.ndarray, ys: slice, xs: slice, scale: tuple[float, float] | None,
                 channels: int | None, invert: bool = False) -> torch.Tensor:
    tile = np.asarray(image[:, ys, xs], dtype=np.float32)
    if scale is not None:
        lo, hi = scale
        tile = (tile - lo) / (hi - lo)
        # bounded as cellrcnn.io.normalize_percentile: NaN -> 0, a 1e30 pixel cannot overflow the network
        tile = np.nan_to_num(tile, nan=0.0, posinf=NORMALISED_LIMIT, neginf=-NORMALISED_LIMIT, copy=False)
        np.clip(tile, -NORMALISED_LIMIT, NORMALISED_LIMIT, out=tile)
    if channels is not None and tile.shape[0] != channels:
        if channels == 1:
            tile = tile.mean(axis=0, keepdims=True)  # colour -> grey, as cellrcnn.io.to_channels
        elif tile.shape[0] == 1:
            tile = np.repeat(tile, channels, axis=0)
        else:
            raise ValueError(f"cannot turn a {tile.shape[0]}-channel image into {channels} channels")
    if invert:
        tile = 1.0 - tile
    return torch.from_numpy(np.ascontiguousarray(tile))


class _TileObjects(NamedTuple):
    """One tile's objects: their boxes (tile pixels, stop exclusive; ``present`` False for an
    empty one), scores, and ``crop(k)``, object k's bool mask inside its box."""

    y0: np.ndarray
    y1: np.ndarray
    x0: np.ndarray
    x1: np.ndarray
    present: np.ndarray
    scores: np.ndarray
    crop: Callable[[int], np.ndarray]


def _tile_objects(pred: dict) -> _TileObjects:
    """The objects of one predict_fn output: a ``label_image`` (h×w, objects 1..N, ``scores[k]``
    of label k+1: no N×h×w masks at all) or ``masks`` (N×h×w, nonzero = object; float
    probabilities are thresholded at 0.5)."""
    if "label_image" in pred:
        labels = _numpy(pred["label_image"])
        scores = np.asarray(_numpy(pred["scores"]), dtype=np.float64).reshape(-1)
        slices = ndimage.find_objects(labels, max_label=len(scores))
        present = np.array([sl is not None for sl in slices], bool)
        box = np.array([(sl[0].start, sl[0].stop, sl[1].start, sl[1].stop) if sl else (0, 0, 0, 0)
                        for sl in slices], np.int64).reshape(-1, 4)
        return _TileObjects(*box.T, present, scores, lambda k: labels[slices[k]] == k + 1)
    masks = _numpy(pred["masks"])
    if masks.ndim == 4:  # N×1×H×W probability maps
        masks = masks[:, 0]
    if masks.dtype.kind == "f":
        masks = masks > 0.5  # integer masks stay as they are: no N×h×w copy
    scores = pred.get("scores")
    scores = np.ones(len(masks), np.float32) if scores is None else _numpy(scores)
    h, w = masks.shape[1:]
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # N×h, N×w: boxes without N full masks
    y0, y1 = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    return _TileObjects(y0, y1, x0, x1, rows.any(axis=1), np.asarray(scores, dtype=np.float64).reshape(-1),
                        lambda k: masks[k, y0[k] : y1[k], x0[k] : x1[k]] != 0)


class _Canvas:
    """The global label image plus per-label bookkeeping (score, tile, area, box), grown on demand."""

    def __init__(self, shape: tuple[int, int], capacity: int = 1024):
        self.labels = np.zeros(shape, np.uint32)
        self.score = np.full(capacity, -np.inf)  # index 0 = background, beaten by any object
        self.tile = np.full(capacity, -1, np.int64)
        self.area = np.zeros(capacity, np.int64)
        self.box = np.zeros((capacity, 4), np.int64)
        self.alive = np.zeros(capacity, bool)
        self.next_id = 1

    def _grow(self) -> None:
        for name in ("score", "tile", "area", "box", "alive"):
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.full_like(old, old[0])]))  # index 0 holds the blank

    def _erase(self, j: int) -> None:
        y0, x0, y1, x1 = self.box[j]
        sub = self.labels[y0:y1, x0:x1]
        sub[sub == j] = 0
        self.alive[j] = False

    def paste(self, mask: np.ndarray, y0: int, x0: int, score: float, tile: int) -> None:
        """Paste a cropped bool mask at (y0, x0), resolving duplicates and pixel conflicts."""
        region = self.labels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        area = int(mask.sum())
        under = region[mask]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        for j, inter in zip(ids, counts, strict=True):
            if self.tile[j] == tile or inter <= DUPLICATE_FRACTION * min(area, self.area[j]):
                continue
            if score > self.score[j]:
                self._erase(j)
            else:
                return  # the same object, already kept with a score at least as high
        if self.next_id == len(self.score):
            self._grow()
        k = self.next_id
        self.next_id += 1
        region[mask & (self.score[region] < score)] = k
        self.score[k], self.tile[k], self.area[k], self.alive[k] = score, tile, area, True
        self.box[k] = (y0, x0, y0 + mask.shape[0], x0 + mask.shape[1])

    def finish(self, chunk_rows: int = 512) -> TiledPrediction:
        """Relabel 1..N without gaps (in place, by row chunks) and return labels and scores."""
        # an object whose pixels all went to higher-scoring overlapping ones is gone
        present = np.zeros(self.next_id, bool)
        for r in range(0, self.labels.shape[0], chunk_rows):  # by chunks: no int64 copy of the image
            present[np.unique(self.labels[r : r + chunk_rows])] = True
        keep = np.flatnonzero(self.alive[: self.next_id] & present)
        lut = np.zeros(self.next_id, np.uint32)
        lut[keep] = np.arange(1, len(keep) + 1, dtype=np.uint32)
        for r in range(0, self.labels.shape[0], chunk_rows):
            self.labels[r : r + chunk_rows] = lut[self.labels[r : r + chunk_rows]]
        return TiledPrediction(self.labels, self.score[keep].astype(np.float32))


def predict_tiled(
    image,
    predict_fn: PredictFn,
    tile_size: int = 1024,
    overlap: int = 128,
    progress: bool = True,
    channels: int | None = None,
    batch_size: int = 1,
    seam_tolerance: float | None = None,
    normalize: bool | None = None,
    invert_bright: bool = False,
    polarity: str = "auto",
) -> TiledPrediction:
    """Instances of a large image by overlapping tiles, merged into one label image.

    Args:
        image: C×H×W (or H×W) numpy array or tensor. Float: already normalised (the model input
            contract). Integer (raw 8/16-bit): normalised here, once for the whole image.
        predict_fn: ``list[Tensor C×h×w] -> list[dict]`` with ``scores`` (N) and either
            ``label_image`` (h×w, objects 1..N; a single tile's is returned as it is) or
            ``masks`` (N×h×w, uint8/bool, or float probabilities thresholded at 0.5); e.g. a
            predictor's ``predict_labels`` (:mod:`cellrcnn.inference.predictor`) or a
            LightningModule's ``predict_instances``.
        tile_size: tile height and width in pixels (smaller images run as one tile).
        overlap: minimum overlap between neighbouring tiles in pixels; must exceed the largest
            object's diameter.
        progress: show a tqdm progress bar over tiles.
        channels: convert each tile to this many channels (1 or 3) for the model; None keeps C.
        batch_size: tiles per ``predict_fn`` call.
        seam_tolerance: widening of each tile's owned region in pixels (default overlap/8, at
            most 16); objects inside the band are seen twice and de-duplicated.
        normalize: scale tiles by the whole image's 1st/99.8th percentiles; None: only integer
            images (raw counts), True also for raw float images (e.g. deconvolved TIFFs).
        invert_bright: invert every tile (``1 - x``) when the whole image has a bright
            background (:func:`cellrcnn.io.bright_background`), as ``prepare_image`` does for
            the models trained that way.
        polarity: ``auto`` (as just said), ``dark`` (invert, the objects are darker than the
            background) or ``bright`` (do not): :func:`cellrcnn.io.inverts`.

    Returns:
        ``TiledPrediction(labels uint32 H×W, scores float32 N)``, ``scores[k - 1]`` for label k.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got overlap={overlap}, tile_size={tile_size}")
    image = _as_chw(image)
    _, height, width = image.shape
    if image.dtype == bool:
        image = image.view(np.uint8)
    if normalize is None:
        normalize = image.dtype.kind != "f"
    scale = estimate_percentiles(image) if normalize else None
    invert = invert_bright and check_polarity(polarity) != "bright" and (
        polarity == "dark" or _bright_background(image, scale))
    tol = min(overlap / 8.0, 16.0) if seam_tolerance is None else float(seam_tolerance)
    ys, xs = tile_starts(height, tile_size, overlap), tile_starts(width, tile_size, overlap)
    own_y, own_x = owned_ranges(ys, tile_size, height), owned_ranges(xs, tile_size, width)
    tiles = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    canvas = _Canvas((height, width))
    n_cut_owned = 0
    with tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not progress) as bar:
        for b in range(0, len(tiles), batch_size):
            batch = tiles[b : b + batch_size]
            windows = [
                (slice(ys[iy], min(ys[iy] + tile_size, height)), slice(xs[ix], min(xs[ix] + tile_size, width)))
                for iy, ix in batch
            ]
            preds = predict_fn([_tile_tensor(image, wy, wx, scale, channels, invert) for wy, wx in windows])
            if len(tiles) == 1 and "label_image" in preds[0]:  # the model's own label image, as it is
                bar.update(1)
                return TiledPrediction(_numpy(preds[0]["label_image"]).astype(np.uint32),
                                       np.asarray(_numpy(preds[0]["scores"]), np.float32).reshape(-1))
            for i, ((iy, ix), (wy, wx)) in enumerate(zip(batch, windows, strict=True)):
                objects = _tile_objects(preds[i])
                preds[i] = None  # free the model's output before the next tile
                n_cut_owned += _merge_tile(
                    canvas, objects, wy, wx, own_y[iy], own_x[ix], tol, (height, width), tile=b + i,
                )
                del objects
            bar.update(len(batch))
    if n_cut_owned:
        warnings.warn(
            f"{n_cut_owned} object(s) touched a tile edge although their centre lay in the tile's own "
            f"region: they are larger than the overlap ({overlap} px) and were dropped; "
            "increase overlap above the largest object diameter",
            stacklevel=2,
        )
    return canvas.finish()


def _bright_background(image: np.ndarray, scale: tuple[float, float] | None) -> bool:
    """:func:`cellrcnn.io.bright_background` of the whole image, from a subsample, as the tiles are scaled."""
    from cellrcnn.io import bright_background, is_stained

    sample = subsample(image)
    stained = is_stained(sample, channel_axis=0)
    if scale is not None:
        sample = (sample - scale[0]) / (scale[1] - scale[0])
    return bright_background(sample, stained=stained)


def _merge_tile(canvas: _Canvas, objects: _TileObjects, wy: slice, wx: slice,
                own_y: tuple[float, float], own_x: tuple[float, float], tol: float,
                shape: tuple[int, int], tile: int) -> int:
    """Select the objects this tile keeps and paste them; return how many owned objects were cut."""
    y0, y1, x0, x1, present = objects.y0, objects.y1, objects.x0, objects.x1, objects.present
    if not present.any():
        return 0
    h, w = wy.stop - wy.start, wx.stop - wx.start
    cy, cx = wy.start + (y0 + y1) / 2.0, wx.start + (x0 + x1) / 2.0
    # an edge is "inner" when it is not the image border: objects touching it are cut
    cut = ((y0 == 0) & (wy.start > 0)) | ((y1 == h) & (wy.stop < shape[0]))
    cut |= ((x0 == 0) & (wx.start > 0)) | ((x1 == w) & (wx.stop < shape[1]))
    owned = (own_y[0] <= cy) & (cy < own_y[1]) & (own_x[0] <= cx) & (cx < own_x[1])
    near = (own_y[0] - tol <= cy) & (cy < own_y[1] + tol) & (own_x[0] - tol <= cx) & (cx < own_x[1] + tol)
    keep = present & near & ~cut
    for k in np.flatnonzero(keep):
        canvas.paste(objects.crop(k), wy.start + int(y0[k]), wx.start + int(x0[k]), float(objects.scores[k]), tile)
    return int((present & owned & cut).sum())


def predict_image(
    raw: np.ndarray,
    predict_fn: PredictFn,
    channels: int = 3,
    tile_size: int = 1024,
    overlap: int = 128,
    progress: bool = True,
    invert_bright: bool = False,
    hematoxylin: bool = False,
    polarity: str = "auto",
) -> TiledPrediction:
    """Labels and scores of one raw image (H×W or H×W×C, any dtype, as :func:`cellrcnn.io.read_image`
    returns it), tiled when larger than ``tile_size``.

    An image that fits one tile gets exactly the evaluation preprocessing
    (:func:`cellrcnn.io.prepare_image`); a larger one stays raw in memory and each tile is
    normalised with percentiles of the whole image. ``invert_bright``, ``hematoxylin``,
    ``polarity``: see :func:`cellrcnn.io.prepare_image`.
    """
    from cellrcnn.io import as_hematoxylin, hematoxylin_density, prepare_image

    raw = np.asarray(raw)
    if raw.dtype == bool:
        raw = raw.view(np.uint8)
    if max(raw.shape[:2]) <= tile_size:
        return predict_tiled(prepare_image(raw, channels, invert_bright, hematoxylin, polarity), predict_fn, tile_size,
                             overlap, progress=False)
    if as_hematoxylin(raw, hematoxylin, polarity):  # one float plane, as prepare_image would make it
        raw, invert_bright = hematoxylin_density(raw), False
    chw = raw[None] if raw.ndim == 2 else np.moveaxis(raw, -1, 0)  # a view: no copy of a large image
    return predict_tiled(chw, predict_fn, tile_size, overlap, progress, channels=channels, normalize=True,
                         invert_bright=invert_bright, polarity=polarity)


def predict_fn_from_label_fn(label_fn: Callable[[np.ndarray], np.ndarray], score: float = 1.0) -> PredictFn:
    """Wrap a label-image segmenter (``C×H×W float -> H×W labels``) as a ``predict_fn``.

    Lets classical methods (e.g. :func:`cellrcnn.baselines.classical.segment_otsu_watershed`)
    run through :func:`predict_tiled`; every object gets the same ``score``.
    """

    def predict_fn(images: list[torch.Tensor]) -> list[dict]:
        out = []
        for image in images:
            labels = np.asarray(label_fn(image.numpy()))
            n = len(np.unique(labels[labels != 0]))
            out.append(labels_to_instances(labels, np.full(n, score, np.float32)))
        return out

    return predict_fn
