"""Pixels to instances: decoding source bytes, label images, outline drawings, binary and
colour-coded masks, each turned into COCO annotations (compressed RLE, exact pixels).

Arrays are H×W (numpy row = y, column = x); colour images are returned as RGB(A), not BGR.
"""

from __future__ import annotations

import io
from pathlib import PurePosixPath

import cv2
import numpy as np
from scipy import ndimage

from cellrcnn.data.converters.common import mask_annotation
from cellrcnn.io import ImageReadError

_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Source bytes -> H×W or H×W×C array (RGB order, stored dtype). TIFFs keep their stored
    bits (a WhiteIsZero 1-bit outline stays as stored); ImageReadError names the file."""
    suffix = PurePosixPath(name).suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                pages = len(tif.series[0].pages) if tif.series else 1
                if pages > 1:  # never page 0 of a stack silently: which plane is the annotated one?
                    raise ImageReadError(f"{name}: a stack of {pages} pages or z-planes ({tif.series[0].axes} "
                                         f"{tif.series[0].shape}); save the annotated plane as its own file")
                arr = tif.pages[0].asarray()
            if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
                arr = np.moveaxis(arr, 0, -1)  # planar CYX -> YXC
        elif suffix == ".npy":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is not None and arr.ndim == 3:
                code = cv2.COLOR_BGRA2RGBA if arr.shape[-1] == 4 else cv2.COLOR_BGR2RGB
                arr = cv2.cvtColor(arr, code)
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile/numpy raise many types for a damaged file
        raise ImageReadError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if arr is None or arr.size == 0 or arr.ndim not in (2, 3):
        raise ImageReadError(f"{name}: cannot decode image (empty, truncated or not an image)")
    return arr


def drop_alpha(arr: np.ndarray) -> np.ndarray:
    """H×W×4 -> H×W×3; H×W×2 (grey + alpha) -> H×W; others unchanged."""
    if arr.ndim == 3 and arr.shape[-1] == 4:
        return arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] == 2:
        return arr[..., 0]
    return arr


def as_binary(arr: np.ndarray) -> np.ndarray:
    """Any mask file's pixels -> bool H×W (non-zero in any colour channel; alpha ignored)."""
    arr = drop_alpha(arr)
    return (arr.max(axis=-1) if arr.ndim == 3 else arr) > 0


def grey_png_if_equal(arr: np.ndarray) -> bytes | None:
    """PNG of one channel when an RGB(A) image holds the same grey in R, G and B, else None.
    Lossless: the model reads the same values with a third of the bytes."""
    rgb = drop_alpha(arr)
    if rgb.ndim == 3 and rgb.shape[-1] == 3 and np.array_equal(rgb[..., 0], rgb[..., 1]) \
            and np.array_equal(rgb[..., 0], rgb[..., 2]):
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., 0]))
        if ok:
            return buf.tobytes()
    return None


def components(binary: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a bool image -> (int32 labels 0..n, stats n+1×5 x,y,w,h,area)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=connectivity,
                                                           ltype=cv2.CV_32S)
    return labels, stats


def label_annotations(labels: np.ndarray, category_id: int = 1, grow_into: np.ndarray | None = None) -> list[dict]:
    """Label image (0 = background; any values, non-consecutive, disconnected labels allowed)
    -> one annotation per non-zero value, ordered by value. ``grow_into`` (bool H×W): dilate
    each instance by 1 px (4-neighbourhood) into those pixels only, e.g. the drawn outline;
    instances sharing an outline then overlap on it."""
    labels = np.asarray(labels)
    values = np.unique(labels)
    values = values[values != 0]
    if values.size == 0:
        return []
    if values[-1] > values.size:  # sparse ids: compact so find_objects stays small
        compact = np.searchsorted(values, labels).astype(np.int64) + 1
        compact[labels == 0] = 0
        labels = compact
    labels = labels.astype(np.int64, copy=False)
    h, w = labels.shape
    buf = np.zeros((h, w), np.uint8, order="F")  # reused: only the object's box is set and cleared
    anns = []
    for value, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        if grow_into is not None:
            sl = (slice(max(sl[0].start - 1, 0), min(sl[0].stop + 1, h)),
                  slice(max(sl[1].start - 1, 0), min(sl[1].stop + 1, w)))
        obj = labels[sl] == value
        if grow_into is not None:
            obj = obj | (cv2.dilate(obj.astype(np.uint8), _CROSS).astype(bool) & grow_into[sl])
        buf[sl] = obj
        ann = mask_annotation(buf, category_id)
        buf[sl] = 0
        if ann is not None:
            anns.append(ann)
    return anns


def outline_pixels(arr: np.ndarray) -> np.ndarray:
    """Outline drawing -> bool H×W outline. Two-valued files: the minority value is the outline,
    whatever the polarity (WhiteIsZero TIFFs read as stored bits give True outlines, Pillow the
    inverse). Multi-valued files: non-zero is the outline."""
    arr = drop_alpha(arr)
    grey = arr.max(axis=-1) if arr.ndim == 3 else arr
    values, counts = np.unique(grey, return_counts=True)
    if values.size == 1:
        return np.zeros(grey.shape, bool)
    if values.size == 2:
        return grey == values[int(np.argmin(counts))]
    return grey > 0


def filled_from_outlines(outline: np.ndarray, min_area: int = 16, connectivity: int = 4
                         ) -> tuple[np.ndarray, int, dict[str, int]]:
    """Outline -> (labels of kept interiors 1..k, components found, drop counts by reason).

    Interiors are the components of the non-outline pixels. Those touching the image border
    are background (or cells with an open outline, which cannot be recovered); those under
    ``min_area`` px are gaps between hand-drawn strokes."""
    labels, stats = components(~outline, connectivity)
    h, w = outline.shape
    x, y, bw, bh, area = (stats[1:, i] for i in range(5))
    border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    small = ~border & (area < min_area)
    keep = ~border & ~small
    lut = np.zeros(len(stats), np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    dropped = {"touching the border": int(border.sum()), f"under {min_area} px": int(small.sum())}
    return lut[labels], len(stats) - 1, dropped


def binary_instances(binary: np.ndarray, min_area: int = 0, connectivity: int = 4
                     ) -> tuple[np.ndarray, int, int]:
    """Binary foreground -> (labels of components >= min_area, components found, dropped)."""
    labels, stats = components(binary, connectivity)
    keep = stats[1:, 4] >= min_area
    lut = np.zeros(len(stats), np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels], len(stats) - 1, int((~keep).sum())


def colour_instances(colours: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """Graph-coloured mask (touching objects differ in value) -> label image: components are
    taken within each colour, so touching nuclei of different colours stay apart."""
    labels = np.zeros(colours.shape, np.int32)
    offset = 0
    for value in np.unique(colours):
        if value == 0:
            continue
        lab, stats = components(colours == value, connectivity)
        inside = lab > 0
        labels[inside] = lab[inside] + offset
        offset += len(stats) - 1
    return labels
