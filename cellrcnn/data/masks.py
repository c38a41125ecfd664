"""Instance masks in every encoding the project meets, and conversions between them.

- COCO RLE (pycocotools): column-major, compressed ``counts`` string or uncompressed list.
- COCO polygons: ``[[x1, y1, x2, y2, ...], ...]``.
- Kaggle RLE strings: ``"start length ..."`` with 1-based starts, column-major for the
  2018 Data Science Bowl (``order="F"``) and row-major for Sartorius (``order="C"``).
- Label images: 2-D integers, 0 = background, one value per object.

Masks are uint8/bool arrays H×W; stacks are N×H×W.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


class MaskFormatError(ValueError):
    """A segmentation or RLE string does not describe a valid mask."""


def encode_rle(mask: np.ndarray) -> dict:
    """H×W binary mask -> compressed COCO RLE with a JSON-ready ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE ``counts`` string (the inverse of pycocotools'
    ``rleToString``: 5 bits per character from ``'0'``, a continuation bit, a sign bit, and each
    run after the second stored as the difference to the run two before).

    pycocotools decodes a corrupt string into garbage, a bare ValueError or a crash; here any
    character outside ``'0'..'o'``, a string that ends inside a number, or a negative run is a
    :class:`MaskFormatError`."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    if not isinstance(counts, str):
        raise MaskFormatError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
    runs: list[int] = []
    value = shift = 0
    for pos, char in enumerate(counts):
        code = ord(char) - 48
        if not 0 <= code < 64:
            raise MaskFormatError(f"RLE counts hold an invalid character {char!r} at position {pos}")
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:  # more groups follow
            continue
        if code & 0x10:  # sign bit of the last group
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise MaskFormatError(f"RLE counts decode to a negative run ({value}) at position {pos}")
        runs.append(value)
        value = shift = 0
    if shift:
        raise MaskFormatError("RLE counts end inside a number (truncated string)")
    return runs


def check_segmentation(segmentation, height: int, width: int, margin: float = 1.0) -> None:
    """Raise :class:`MaskFormatError` unless ``segmentation`` is a mask of an H×W image: polygons
    with an even number (>= 6) of finite coordinates within ``margin`` px of the image, or an RLE
    of size [H, W] whose runs are non-negative and sum to H×W. Checked before pycocotools sees it:
    a NaN or 1e30 coordinate made it allocate tens of GB, a truncated RLE gave a partial mask."""
    if isinstance(segmentation, list):
        for poly in segmentation:
            try:
                coords = np.asarray(poly)
            except (TypeError, ValueError) as exc:  # ragged nesting
                raise MaskFormatError(f"polygon holds a non-number ({exc})") from exc
            if coords.dtype.kind not in "iuf":  # strings, None, booleans, nested lists
                raise MaskFormatError(f"polygon holds a non-number ({str(poly)[:60]})")
            coords = coords.astype(np.float64)
            if coords.ndim != 1 or len(coords) < 6 or len(coords) % 2:
                raise MaskFormatError(f"polygon with {coords.size} coordinates; need an even number >= 6")
            if not np.isfinite(coords).all():
                raise MaskFormatError("polygon holds a NaN or infinite coordinate")
            x, y = coords[0::2], coords[1::2]
            if x.min() < -margin or y.min() < -margin or x.max() > width + margin or y.max() > height + margin:
                raise MaskFormatError(
                    f"polygon outside the {height}×{width} image (x {x.min():g}..{x.max():g}, y {y.min():g}..{y.max():g})"
                )
        return
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size")
        if not isinstance(size, list | tuple) or list(size) != [height, width]:
            raise MaskFormatError(f"RLE size {size} differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise MaskFormatError("uncompressed RLE counts must be non-negative integers")
            runs = counts
        else:
            runs = rle_counts(counts)
        if sum(runs) != height * width:
            raise MaskFormatError(
                f"RLE covers {sum(runs)} pixels, the {height}×{width} image has {height * width} (truncated or corrupt)"
            )
        return
    raise MaskFormatError(f"unknown segmentation type {type(segmentation).__name__}")


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Any COCO ``segmentation`` (polygons, compressed or uncompressed RLE) -> uint8 H×W.

    Checked first (:func:`check_segmentation`): a malformed one raises :class:`MaskFormatError`."""
    if isinstance(segmentation, list) and len(segmentation) == 0:
        return np.zeros((height, width), np.uint8)
    check_segmentation(segmentation, height, width)
    if isinstance(segmentation, list):
        polygons = [list(map(float, p)) for p in segmentation]
        rles = mask_utils.frPyObjects(polygons, height, width)
        return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(np.uint8)


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """Tight COCO box ``[x, y, w, h]`` in pixels (x = column) of a binary mask; zeros if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def masks_to_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """N×H×W masks -> N×4 float32 ``x1, y1, x2, y2`` (exclusive max: a 1-px mask has width 1)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        x, y, w, h = mask_to_bbox(m)
        boxes[i] = (x, y, x + w, y + h)
    return boxes


def decode_rle_string(rle: str, height: int, width: int, order: str = "F") -> np.ndarray:
    """Kaggle ``"start length ..."`` RLE (1-based starts) -> uint8 H×W.

    ``order="F"``: column-major (2018 Data Science Bowl); ``order="C"``: row-major (Sartorius).
    """
    values = str(rle).split()
    if len(values) % 2:
        raise MaskFormatError(f"RLE has an odd number of values ({len(values)})")
    try:
        pairs = np.asarray(values, dtype=np.int64).reshape(-1, 2)
    except ValueError as exc:
        raise MaskFormatError(f"RLE holds a non-integer value: {exc}") from exc
    starts, lengths = pairs[:, 0] - 1, pairs[:, 1]
    total = height * width
    if len(pairs) and (starts.min() < 0 or lengths.min() <= 0 or (starts + lengths).max() > total):
        raise MaskFormatError(f"RLE runs outside a {height}×{width} image")
    flat = np.zeros(total, np.uint8)
    for s, n in zip(starts, lengths, strict=True):
        flat[s : s + n] = 1
    return flat.reshape((height, width), order=order)


def encode_rle_string(mask: np.ndarray, order: str = "F") -> str:
    """uint8 H×W -> Kaggle ``"start length ..."`` RLE string (1-based starts)."""
    flat = np.concatenate([[0], mask.astype(np.uint8).ravel(order=order), [0]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends, strict=True))


def object_slices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """The objects of an H×W label image, from one pass over it: ``(ids, compact, slices)``.

    ``ids``: the sorted non-zero values (N; they need not be consecutive, and a disconnected
    value stays one object); ``compact``: int64 H×W with them renumbered 1..N in that order (0
    stays background); ``slices[i]``: the bounding (row, column) slices of object ``i + 1``.
    Working inside each object's box keeps callers linear in the image size for thousands of
    objects.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    compact = (np.searchsorted(ids, labels) + 1) * (labels != 0)
    return ids, compact, (ndimage.find_objects(compact, max_label=ids.size) if ids.size else [])


def label_image_to_masks(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label image -> (N×H×W uint8 masks, N label values), ordered by label value.

    Labels need not be consecutive; a disconnected label stays one instance.
    """
    ids, compact, slices = object_slices(labels)
    masks = np.zeros((ids.size, *compact.shape), np.uint8)
    for i, sl in enumerate(slices):
        masks[i][sl] = compact[sl] == i + 1
    return masks, ids


def masks_to_label_image(masks: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """N×H×W masks -> label image (1..N in input order). Where masks overlap the
    higher-scoring one wins (the later one when no scores are given)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be N×H×W, got shape {masks.shape}")
    n, h, w = masks.shape
    labels = np.zeros((h, w), dtype=np.int64)
    order = np.arange(n) if scores is None else np.argsort(np.asarray(scores), kind="stable")
    for i in order:  # paint low to high so the best object ends on top
        labels[masks[i] > 0] = i + 1
    return labels
