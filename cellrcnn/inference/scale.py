"""Predicting at the object size a model was trained on (``predict.py diameter=...``).

A trained model knows the object sizes of its training set (scale jitter widens them by a
few tens of percent). A different objective, camera or binning makes nuclei two or four times
larger or smaller, and then a model splits big nuclei into fragments or misses small ones. The
field's answer is Cellpose's ``diameter`` and StarDist's ``scale``: resize the image so that
its objects have the training size, predict, and resize the labels back.

- ``diameter=<pixels>``: the typical object diameter in the user's images. The image is
  resized by ``model_diameter / diameter``.
- ``diameter=auto``: a measuring pass at the native size (with a quick predictor: one view of
  the central :data:`PROBE_WINDOW` window) finds the median object diameter. The image is
  resized only when that median differs from the model's by more than :data:`TOLERANCE` (the
  range the training scale jitter already covers), and only when the pass found at least
  :data:`MIN_OBJECTS` objects to measure; it enlarges at most :data:`AUTO_MAX_ENLARGEMENT`-fold.
  Without a quick predictor the measuring pass is the full native prediction, kept when no
  resizing is needed.
- ``diameter=shrink`` (the default of most models): a quick measuring pass (one view, at half size, of a central
  window of at most :data:`PROBE_WINDOW` px) finds the median object diameter. Only an image whose
  objects are larger than nearly all training objects (their 99th percentile, 54 px for
  ``nuclei``) is shrunk, to their 95th percentile (39 px): the largest size the model knows well,
  which keeps the most detail. No image is enlarged. A model trained on 19-px nuclei segments
  45-px nuclei well at native size (shrinking them to 19 px lost dsb_score on DSB2018), but
  splits 110-180 px nuclei of 40x-63x fields, which it predicts better and up to 16 times faster
  shrunk (held-out S-BSST265 fields: bench/results/predict_speed).

- ``diameter=range`` (``nuclei``'s default): objects outside the sizes the model knows are
  brought into them: shrunk as ``shrink`` shrinks, enlarged as ``auto`` enlarges. ``shrink``'s
  half-size pass measures first; unless it finds objects to shrink or objects at least the
  training median, a second quick pass at native size, where small objects are seen, decides
  the enlargement. (Measured at native size alone, nuclei of 200-400 px that the model splits
  read small and were enlarged further.) Held-out DSB2018 fields at half magnification score
  dsb_score 0.42 with ``shrink`` and 0.49 with ``auto``, which loses 0.01 at the native
  magnification by shrinking fields of 30-50 px nuclei the model segments well as they are
  (bench/results/robustness).

- ``diameter=default`` (what ``predict.py``, ``evaluate.py``, the API and the service use unless
  told otherwise): the mode the model's checkpoint recommends (hyper-parameter
  ``default_diameter``, written when a model is shipped), else ``shrink``. ``nuclei_he`` records
  ``auto``: it trained on H&E tissue resized towards one nucleus size, and held-out 40x tissue
  at native size has nuclei smaller than that (MoNuSeg pq@0.5 0.445 with shrink, 0.502 with auto);
  ``nuclei`` records ``range``.

``model_diameter`` is the median equivalent diameter of the training objects, recorded in the
checkpoint by ``train.py`` (hyper-parameter ``object_diameter``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

# the size helpers live in the data layer (below the models); importable from here as before
from cellrcnn.data.sizes import (  # noqa: F401
    MIN_OBJECTS,
    annotation_diameter,
    equivalent_diameter,
    median_diameter,
    object_diameters,  # noqa: F401
)
from cellrcnn.errors import UsageError

TOLERANCE = 1.3  # sizes within this ratio of the training median need no resizing
FACTOR_LIMITS = (0.25, 4.0)  # beyond these the image loses its objects or grows 16-fold
AUTO_MAX_ENLARGEMENT = 2.0  # auto: a first pass that mistakes noise for tiny objects must not blow an image up 16-fold
MAX_RESIZED_PIXELS = 1 << 25  # an image is not enlarged beyond ~34 megapixels (time and memory)
SHRINK = "shrink"  # the diameter mode of a model that recommends none
AUTO, RANGE = "auto", "range"
DEFAULT = "default"  # the model's recommended mode (predict.py, evaluate.py, the API and the service)
NATIVE = "native"  # another name of None (native size), for forms and commands where null is awkward
# shrink without a training profile in the checkpoint: these multiples of the median stand in
# for the training diameters' 95th and 99th percentiles (1.8-2.0x and 2.6-2.9x for the shipped models)
SHRINK_TO, SHRINK_ABOVE = 2.0, 2.8
MODES = (AUTO, SHRINK, RANGE)
# shrink's measuring pass: at half size the objects it would shrink (beyond the training 99th
# percentile, about 2.8x the median) still appear at 1.4x the training median or more, a size the
# model segments well; the pass costs a sixteenth of a default prediction
# (one view instead of four, a quarter of the pixels); a larger image is measured on its central
# window only, so that the pass costs at most one 1024² view
PROBE_FACTOR = 0.5
PROBE_WINDOW = 2048
PROBE_MIN_SIDE = 128  # a smaller image is predicted at native size without measuring

LabelFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # raw image -> (labels, scores)


def resize_image(raw: np.ndarray, factor: float) -> np.ndarray:
    """H×W or H×W×C image resized by ``factor`` (bilinear, anti-aliased when shrinking), same dtype."""
    raw = np.asarray(raw)
    if raw.dtype == bool:
        raw = raw.view(np.uint8)
    h, w = raw.shape[:2]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    chw = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    chw = chw[None] if raw.ndim == 2 else chw.permute(2, 0, 1)
    out = F.interpolate(chw[None], size=size, mode="bilinear", align_corners=False, antialias=factor < 1)[0]
    out = out[0] if raw.ndim == 2 else out.permute(1, 2, 0)
    out = out.numpy()
    if raw.dtype.kind in "ui":
        info = np.iinfo(raw.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return np.ascontiguousarray(out.astype(raw.dtype))


def _renumber(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A resized label image whose ids are those of ``scores`` (1..N), some maybe lost on the way:
    the present ones renumbered 1..M in order, with their scores."""
    present = np.zeros(len(scores) + 1, bool)
    present[np.unique(labels)] = True
    present[0] = False
    lut = np.zeros(len(scores) + 1, labels.dtype)
    lut[present] = np.arange(1, int(present.sum()) + 1)
    return lut[labels], np.asarray(scores, np.float32)[present[1:]]


def resize_labels(labels: np.ndarray, scores: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resize of a label image to ``shape``; objects lost on the way (smaller
    than a pixel of the target grid) are dropped, the rest renumbered 1..N with their scores."""
    labels = np.asarray(labels)
    h, w = labels.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    resized = labels[rows[:, None], cols[None, :]]
    return _renumber(resized, scores)


def enlarge_labels(labels: np.ndarray, scores: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A label image predicted on a shrunk image, brought back up to ``shape`` with smooth
    outlines: each object's mask is interpolated bilinearly inside its box, and a pixel goes to
    the object whose interpolated mask is highest there, if above one half. Nearest-neighbour
    enlargement (:func:`resize_labels`) would draw outlines in steps of 1/factor pixels. Objects
    left without a pixel are dropped, the rest renumbered 1..N with their scores."""
    from scipy import ndimage

    labels = np.asarray(labels)
    h, w = labels.shape
    sy, sx = shape[0] / h, shape[1] / w
    out = np.zeros(shape, labels.dtype)
    best = np.zeros(shape, np.float32)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        y0, y1 = max(box[0].start - 1, 0), min(box[0].stop + 1, h)  # a pixel of margin to fade out
        x0, x1 = max(box[1].start - 1, 0), min(box[1].stop + 1, w)
        ys, xs = slice(round(y0 * sy), round(y1 * sy)), slice(round(x0 * sx), round(x1 * sx))
        mask = torch.from_numpy((labels[y0:y1, x0:x1] == k).astype(np.float32))[None, None]
        up = F.interpolate(mask, size=(ys.stop - ys.start, xs.stop - xs.start), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        take = (up > 0.5) & (up > best[ys, xs])
        out[ys, xs][take] = k
        best[ys, xs][take] = up[take]
    return _renumber(out, scores)


def scale_factor(object_diameter: float, model_diameter: float) -> float:
    """Resize factor that brings ``object_diameter`` to ``model_diameter``, within FACTOR_LIMITS."""
    if not object_diameter > 0 or not model_diameter > 0:
        raise ValueError(f"diameters must be positive, got {object_diameter} and {model_diameter}")
    return float(np.clip(model_diameter / object_diameter, *FACTOR_LIMITS))


def resolve_diameter(diameter: float | str | None, model_default: str | None) -> float | str | None:
    """``diameter``, with :data:`DEFAULT` replaced by the model's recommended mode (``shrink`` when
    its checkpoint names none) and :data:`NATIVE` by None."""
    if diameter == NATIVE:
        return None
    return (model_default or SHRINK) if diameter == DEFAULT else diameter


def check_diameter(diameter: float | str | None, model_diameter: float | None, checkpoint: str = "") -> None:
    """Raise a UsageError (a ValueError) saying what to do when ``diameter`` cannot be used with this model."""
    if diameter in (None, DEFAULT, NATIVE) or (diameter == SHRINK and not model_diameter):
        return  # shrink needs the training size; a checkpoint without it predicts at native size
    if diameter not in MODES and not (isinstance(diameter, (int, float)) and diameter > 0):
        raise UsageError(f"diameter must be a positive number of pixels, auto, shrink, range, default or null "
                         f"(native), got {diameter!r}")
    if not model_diameter:
        raise UsageError(
            f"{checkpoint or 'this checkpoint'}: it does not record the object size it was trained on "
            "(hyper-parameter object_diameter, written by train.py), so diameter=... cannot be used "
            "with it; predict without diameter, or retrain it"
        )


def central_window(raw: np.ndarray, size: int) -> np.ndarray:
    """The central ``size``×``size`` window of an image (the whole image when smaller)."""
    h, w = np.asarray(raw).shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return raw[top:top + size, left:left + size]


def probe_diameter(raw: np.ndarray, probe_fn: LabelFn, factor: float = PROBE_FACTOR,
                   min_side: int = PROBE_MIN_SIDE) -> float | None:
    """Median object diameter (px of ``raw``) from one quick pass at ``factor`` size over the
    central :data:`PROBE_WINDOW` window; None when the image is smaller than ``min_side`` or
    the pass finds fewer than :data:`MIN_OBJECTS` objects."""
    if min(np.asarray(raw).shape[:2]) < min_side:
        return None
    window = central_window(raw, PROBE_WINDOW)
    labels, _ = probe_fn(window if factor == 1 else resize_image(window, factor))
    measured = median_diameter(labels)
    return None if measured is None else measured / factor


def shrink_sizes(model_diameter: float, profile: Mapping | None = None) -> tuple[float, float]:
    """``(to, above)`` of ``diameter=shrink``: objects of a median diameter above ``above`` px are
    brought to ``to`` px: the 99th and 95th percentiles of the training diameters (a checkpoint's
    training profile, :func:`cellrcnn.inference.choice.training_profile`), else multiples of the
    training median."""
    sizes = (profile or {}).get("object_diameter_px") or {}
    if sizes.get("p95") and sizes.get("p99"):
        return float(sizes["p95"]), float(sizes["p99"])
    return SHRINK_TO * model_diameter, SHRINK_ABOVE * model_diameter


def mode_factor(mode: str, measured: float | None, model_diameter: float, profile: Mapping | None = None) -> float:
    """The resize that ``shrink``, ``auto`` or ``range`` gives an image whose objects' median diameter is
    ``measured`` (None: too few objects to measure): 1.0 for sizes the model knows."""
    if measured is None:
        return 1.0
    factor = min(scale_factor(measured, model_diameter), AUTO_MAX_ENLARGEMENT)
    if mode == AUTO or (mode == RANGE and factor > TOLERANCE):
        return 1.0 if 1 / TOLERANCE <= factor <= TOLERANCE else factor
    to, above = shrink_sizes(model_diameter, profile)  # shrink, and range for all but small objects
    return scale_factor(measured, to) if measured > above else 1.0


def predict_at_diameter(
    raw: np.ndarray, label_fn: LabelFn, diameter: float | str | None, model_diameter: float | None,
    probe_fn: LabelFn | None = None, profile: Mapping | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Labels and scores of ``raw`` predicted at the model's object size.

    Args:
        raw: H×W(×C) image as read from disk.
        label_fn: the native predictor, ``raw -> (labels H×W, scores N)``.
        diameter: None (native size), the objects' typical diameter in pixels, ``"auto"``,
            ``"range"`` or ``"shrink"`` (native size without a ``model_diameter``).
        model_diameter: the training objects' median diameter (the checkpoint's ``object_diameter``).
        probe_fn: the quick predictor (one view) of the measuring pass of ``shrink``, ``auto`` and
            ``range``; default ``label_fn``.
        profile: the model's training profile, for the sizes ``shrink`` and ``range`` shrink (:func:`shrink_sizes`).

    Returns:
        ``labels`` (the image's own size), ``scores`` and ``info``: ``factor`` (the resize
        applied; 1 = native) and, for ``auto`` and ``shrink``, the ``measured_diameter`` of the
        first pass (None: too few objects to measure).
    """
    diameter = resolve_diameter(diameter, None)  # callers resolve "default" with the model's own mode
    check_diameter(diameter, model_diameter)
    if diameter is None or (diameter == SHRINK and not model_diameter):
        labels, scores = label_fn(raw)
        return labels, scores, {"factor": 1.0}
    info: dict = {}
    first = None  # auto's native prediction, when it measured with the full predictor
    if diameter in (SHRINK, RANGE):
        measured = probe_diameter(raw, probe_fn or label_fn)
        info["measured_diameter"] = None if measured is None else round(measured, 2)
        factor = mode_factor(SHRINK, measured, model_diameter, profile)
        if diameter == RANGE and factor == 1.0 and (measured is None or measured < model_diameter):
            # small objects vanish at half size: they are measured again at native size. Large ones
            # are not, since at native size the model splits them and they would read small.
            measured = probe_diameter(raw, probe_fn or label_fn, factor=1.0, min_side=0)
            info["measured_diameter"] = None if measured is None else round(measured, 2)
            factor = max(1.0, mode_factor(RANGE, measured, model_diameter, profile))
        if factor == 1.0:  # objects of sizes the model knows: native size
            labels, scores = label_fn(raw)
            return labels, scores, {"factor": 1.0, **info}
    elif diameter == AUTO:
        if probe_fn is None:  # the full native prediction measures, and stands when it needs no resizing
            first = label_fn(raw)
            measured = median_diameter(first[0])
        else:  # small objects are measured at native size, on one view of the central window
            measured = probe_diameter(raw, probe_fn, factor=1.0, min_side=0)
        info["measured_diameter"] = None if measured is None else round(measured, 2)
        factor = mode_factor(AUTO, measured, model_diameter)
        if factor == 1.0:
            labels, scores = first or label_fn(raw)
            return labels, scores, {"factor": 1.0, **info}
    else:
        factor = scale_factor(float(diameter), model_diameter)
        if not math.isclose(factor, model_diameter / float(diameter)):
            warnings.warn(f"diameter={float(diameter):g} px asks for a {model_diameter / float(diameter):.3g}× resize; "
                          f"limited to {factor:g}× (resizes stay within {FACTOR_LIMITS[0]:g}-{FACTOR_LIMITS[1]:g}×)",
                          stacklevel=2)
    h, w = np.asarray(raw).shape[:2]
    if factor > 1 and h * w * factor**2 > MAX_RESIZED_PIXELS:
        factor = max(1.0, math.sqrt(MAX_RESIZED_PIXELS / (h * w)))
        warnings.warn(f"a {w}×{h} image enlarged {factor:.2f}× only (memory); its objects stay smaller "
                      "than the model's training size", stacklevel=2)
        if factor == 1.0:  # no larger after all: the native prediction
            labels, scores = first or label_fn(raw)
            return labels, scores, {"factor": 1.0, **info}
    small_labels, scores = label_fn(resize_image(raw, factor))
    resize = enlarge_labels if factor < 1 else resize_labels  # back up smoothly, or down by sampling
    labels, scores = resize(small_labels, scores, tuple(np.asarray(raw).shape[:2]))
    return labels, scores, {"factor": round(factor, 4), **info}
