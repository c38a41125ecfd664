"""Exports of a label image to the tools researchers open next.

- Label TIFF (uint16/uint32): Cellpose, napari, CellProfiler, Fiji "Label image to ROIs".
- COCO results JSON: a list of ``{image_id, category_id, segmentation (compressed RLE), bbox,
  area, score}``, the format of pycocotools' ``loadRes`` and of detection benchmarks.
- GeoJSON FeatureCollection for QuPath (File > Import objects): one Polygon (MultiPolygon when
  an object has several parts) per object, ``objectType`` "detection" or "annotation", a
  classification and optional measurements; holes are interior rings.
- ImageJ/Fiji ROI zip (``roifile``): one traced polygon ROI per object, named by its label
  (zero-padded so the ROI Manager sorts them); the outer outline of the largest part only, since
  ImageJ polygon ROIs have no holes (as with "Analyze Particles ... include holes").
- Overlay PNG: object outlines in colour over the image, normalised like the model input.

Outlines follow pixel edges: vertex (x, y) is a pixel corner, pixel (col c, row r) covers
[c, c+1) × [r, r+1), so filling a polygon by pixel centres gives the mask back exactly and its
area equals the pixel count (QuPath and ImageJ use the same convention). Coordinates are in
pixels of the full image.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.measure import find_contours

from cellrcnn.inference.tiling import estimate_percentiles
from cellrcnn.io import as_hwc, atomic_write, is_protected, write_label_image

if TYPE_CHECKING:  # pandas loads only where measurements are asked for
    import pandas as pd

__all__ = ["free_stem", "write_label_tiff", "coco_results", "write_coco_results", "object_polygons", "to_geojson",
           "write_geojson", "write_imagej_rois", "overlay_outlines", "write_overlay_png", "write_exports"]


def write_label_tiff(path: str | Path, labels: np.ndarray) -> Path:
    """Label image as a compressed uint16 (uint32 above 65,535 objects) TIFF."""
    return write_label_image(path, labels)


def _objects(labels: np.ndarray) -> Iterator[tuple[int, tuple[slice, slice], np.ndarray]]:
    """(label, bounding slices, bool crop mask) per object, in label order, one pass over the image."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label image must be 2-D, got shape {labels.shape}")
    ints = labels if labels.dtype.kind in "iu" else labels.astype(np.int64)  # no copy of uint32 labels
    for i, sl in enumerate(ndimage.find_objects(ints)):
        if sl is not None:
            yield i + 1, sl, labels[sl] == i + 1


def _score_of(scores, label: int) -> float | None:
    if scores is None:
        return None
    # a pandas Series (from a measurements table) is looked up by label; pandas is not imported for it
    pandas = sys.modules.get("pandas")
    if isinstance(scores, Mapping) or (pandas is not None and isinstance(scores, pandas.Series)):
        return float(scores[label]) if label in scores else None
    return float(scores[label - 1])


def _rle_from_crop(crop: np.ndarray, sl: tuple[slice, slice], height: int, width: int) -> dict:
    """Compressed COCO RLE of a full-size mask given only its crop (never builds H×W)."""
    cols, rows = np.nonzero(crop.T)  # column-major order, as COCO RLE
    idx = (cols + sl[1].start) * height + rows + sl[0].start
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([idx[:1], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks] + 1, idx[-1:] + 1])
    counts = np.empty(2 * len(starts) + 1, np.int64)
    counts[0] = starts[0]
    counts[1:-1:2] = ends - starts
    counts[2:-1:2] = starts[1:] - ends[:-1]
    counts[-1] = height * width - ends[-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def coco_results(labels: np.ndarray, image_id: int, scores=None, category_id: int = 1) -> list[dict]:
    """COCO results (one dict per object) of a label image; ``scores[k - 1]`` or ``{k: s}`` for
    label k (1.0 when None). Concatenate the lists of many images into one results file."""
    h, w = np.asarray(labels).shape
    out = []
    for k, sl, crop in _objects(labels):
        s = _score_of(scores, k)
        out.append({
            "image_id": int(image_id), "category_id": int(category_id),
            "segmentation": _rle_from_crop(crop, sl, h, w),
            "bbox": [float(sl[1].start), float(sl[0].start), float(sl[1].stop - sl[1].start),
                     float(sl[0].stop - sl[0].start)],
            "area": float(crop.sum()), "score": 1.0 if s is None else s,
        })
    return out


def write_coco_results(path: str | Path, results: list[dict], images: list[dict] | None = None,
                       category: str = "nucleus") -> Path:
    """Write COCO results (from :func:`coco_results`, possibly of many images) as JSON.

    Without ``images``: the plain results list (pycocotools ``loadRes``). With ``images`` (COCO
    image dicts: ``id``, ``file_name``, ``height``, ``width``): a complete COCO dataset whose
    annotations carry ``id``, ``iscrowd`` 0 and ``score``, which annotation tools (CVAT, FiftyOne)
    and :class:`cellrcnn.data.coco.CocoInstanceDataset` open directly.
    """
    path = Path(path)
    data: object = results
    if images is not None:
        annotations = [{**r, "id": i + 1, "iscrowd": 0} for i, r in enumerate(results)]
        data = {"info": {"description": "cellrcnn predictions"}, "images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": category}]}
    text = json.dumps(data)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


EXPORT_FORMATS = ("tiff", "geojson", "imagej", "overlay")
EXPORT_SUFFIXES = (".tif", ".geojson", "_rois.zip", "_overlay.png")  # <stem><suffix> per format


def free_stem(out_dir: str | Path, stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem_pred``, ``stem_pred2``, ... : the first whose exports would neither
    replace an input file (:func:`cellrcnn.io.protect_inputs`, e.g. ``a.tif`` predicted into its
    own folder) nor repeat a stem of this run (``taken``). ``_pred`` is a suffix the evaluation
    command pairs with ground truth."""
    out_dir = Path(out_dir)
    for n in range(1000):
        name = stem if n == 0 else f"{stem}_pred{n if n > 1 else ''}"
        if name not in taken and not any(is_protected(out_dir / f"{name}{s}") for s in EXPORT_SUFFIXES):
            return name
    raise FileExistsError(f"{out_dir}: no free output name for {stem}")


def write_exports(
    out_dir: str | Path,
    stem: str,
    labels: np.ndarray,
    image_raw: np.ndarray | None = None,
    scores=None,
    formats: tuple[str, ...] = ("tiff", "overlay"),
    measurements: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write one image's exports into ``out_dir``: ``<stem>.tif`` (label image), ``<stem>.geojson``,
    ``<stem>_rois.zip``, ``<stem>_overlay.png`` (needs ``image_raw``); returns {format: path}."""
    unknown = set(formats) - set(EXPORT_FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from {EXPORT_FORMATS}")
    out_dir = Path(out_dir)
    written = {}
    if "tiff" in formats:
        written["tiff"] = write_label_tiff(out_dir / f"{stem}.tif", labels)
    if "geojson" in formats:
        written["geojson"] = write_geojson(out_dir / f"{stem}.geojson", labels, measurements=measurements,
                                           scores=scores)
    if "imagej" in formats:
        written["imagej"] = write_imagej_rois(out_dir / f"{stem}_rois.zip", labels, measurements=measurements)
    if "overlay" in formats:
        if image_raw is None:
            raise ValueError(f"{stem}: an overlay needs the image (image_raw)")
        written["overlay"] = write_overlay_png(out_dir / f"{stem}_overlay.png", image_raw, labels)
    return written


def _clean_ring(points: np.ndarray) -> np.ndarray:
    """Drop repeated and collinear vertices of a closed ring (given without the closing point)."""
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    points = points[keep] if keep.any() else points[:1]
    if len(points) < 3:
        return points
    d_in, d_out = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    straight = (cross == 0) & ((d_in * d_out).sum(axis=1) > 0)
    return points[~straight]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _part_rings(part: np.ndarray) -> list[np.ndarray]:
    """Pixel-edge rings (x, y) of one 4-connected part: outer first (positive area), then holes.

    Marching squares on the mask upsampled ×2 puts every contour point within 1/4 px of a pixel
    edge or corner, so rounding gives the exact pixel-edge outline.
    """
    up = np.pad(part, 1).repeat(2, axis=0).repeat(2, axis=1).astype(np.uint8)
    rings = []
    for contour in find_contours(up, 0.5):
        yx = np.round((contour[:-1] + 0.5) / 2.0) - 1  # upsampled index -> pixel corners, unpadded
        ring = _clean_ring(yx[:, ::-1].astype(np.int64))
        if len(ring) >= 3:
            rings.append(ring)
    rings.sort(key=lambda r: -abs(_signed_area(r)))  # the outer ring encloses the holes
    return [r if (_signed_area(r) > 0) == (i == 0) else r[::-1] for i, r in enumerate(rings)]


def object_polygons(labels: np.ndarray) -> Iterator[tuple[int, list[list[np.ndarray]]]]:
    """(label, parts) per object; each part is ``[outer, *holes]``, int64 (x, y) rings in full-image
    pixel-corner coordinates, not closed (first point not repeated), largest part first."""
    for k, sl, crop in _objects(labels):
        comps, n = ndimage.label(crop)  # 4-connectivity: diagonal pixels are separate parts
        parts = []
        for c in range(1, n + 1):
            rings = _part_rings(comps == c)
            offset = np.array([sl[1].start, sl[0].start])
            parts.append([r + offset for r in rings])
        parts.sort(key=lambda p: -abs(_signed_area(p[0])))
        yield k, parts


def _closed(ring: np.ndarray) -> list[list[float]]:
    return [[float(x), float(y)] for x, y in ring] + [[float(ring[0, 0]), float(ring[0, 1])]]


ANOMALY_COLOR = (255, 0, 0)  # cells flagged by the shape-anomaly model, in QuPath and Fiji


def anomalous_labels(measurements: pd.DataFrame | None) -> set[int]:
    """Labels of the rows flagged ``is_anomalous`` (empty without the column)."""
    if measurements is None or "is_anomalous" not in measurements:
        return set()
    return {int(k) for k in measurements.loc[measurements["is_anomalous"].astype(bool), "label"]}


def to_geojson(
    labels: np.ndarray,
    object_type: str = "detection",
    classification: str | None = "Nucleus",
    color: tuple[int, int, int] = (255, 200, 0),
    measurements: pd.DataFrame | None = None,
    scores=None,
) -> dict:
    """QuPath-compatible GeoJSON FeatureCollection, one feature per object.

    ``measurements``: a :func:`~cellrcnn.inference.measurements.measure` table (rows matched by
    ``label``); its numeric columns go to ``properties.measurements``. ``scores`` (``scores[k-1]``
    or ``{k: s}``) adds a ``score`` measurement. Cells flagged ``is_anomalous`` (``anomaly=true``)
    are classified ``<classification>: anomalous`` in red, so QuPath can select and count them.
    """
    if object_type not in ("detection", "annotation", "cell"):
        raise ValueError(f"object_type must be 'detection', 'annotation' or 'cell', got {object_type!r}")
    rows, flagged = {}, anomalous_labels(measurements)
    if measurements is not None:
        numeric = measurements.select_dtypes(["number", "bool"]).astype(float)
        rows = {int(k): r for k, r in zip(measurements["label"], numeric.to_dict("records"), strict=True)}
    features = []
    for k, parts in object_polygons(labels):
        polys = [[_closed(r) for r in part] for part in parts]
        geometry = ({"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1
                    else {"type": "MultiPolygon", "coordinates": polys})
        props: dict = {"objectType": object_type, "name": str(k)}
        if object_type == "annotation":
            props["isLocked"] = False
        if classification and k in flagged:
            props["classification"] = {"name": f"{classification}: anomalous", "color": list(ANOMALY_COLOR)}
        elif classification:
            props["classification"] = {"name": classification, "color": list(color)}
        values = {key: float(v) for key, v in rows.get(k, {}).items() if np.isfinite(v)}
        s = _score_of(scores, k)
        if s is not None:
            values["score"] = s
        if values:
            props["measurements"] = values
        # no feature "id": QuPath reads it as the object's UUID and creates one when it is absent
        features.append({"type": "Feature", "geometry": geometry, "properties": props})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, labels: np.ndarray, **kwargs) -> Path:
    """Write :func:`to_geojson` of a label image (keyword arguments passed on)."""
    text = json.dumps(to_geojson(labels, **kwargs))
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_imagej_rois(path: str | Path, labels: np.ndarray, measurements: pd.DataFrame | None = None) -> Path:
    """ImageJ/Fiji ROI set (``.zip``) with one traced polygon ROI per object, named by label;
    cells flagged ``is_anomalous`` in ``measurements`` are named ``<label>-anomalous`` and drawn red."""
    import roifile

    path = Path(path)
    if path.suffix.lower() != ".zip":
        raise ValueError(f"{path}: an ImageJ ROI set is a .zip file")
    labels = np.asarray(labels)
    digits = len(str(int(labels.max()))) if labels.size else 1
    flagged = anomalous_labels(measurements)
    rois = []
    for k, parts in object_polygons(labels):
        outer = parts[0][0]
        name = f"{k:0{digits}d}" + ("-anomalous" if k in flagged else "")
        roi = roifile.ImagejRoi.frompoints(outer.astype(np.int32), name=name)
        roi.roitype = roifile.ROI_TYPE.TRACED  # pixel-edge outline, as ImageJ's wand produces
        if k in flagged:
            roi.stroke_color = bytes((255, *ANOMALY_COLOR))  # ARGB
        roi.right, roi.bottom = int(outer[:, 0].max()), int(outer[:, 1].max())
        rois.append(roi)

    def write(tmp: Path) -> None:  # a fresh temporary file: roiwrite would append to an existing zip
        if rois:
            roifile.roiwrite(tmp, rois, mode="w")
        else:  # an empty but valid ROI set
            import zipfile

            zipfile.ZipFile(tmp, "w").close()

    return atomic_write(path, write)


def _normalised_hwc(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Image (H×W, H×W×C or C×H×W, any dtype and range) -> float32 H×W×C in about [0, 1], by the
    1st/99.8th percentiles of the whole image (as the model input), grey or the first 3 channels."""
    image = as_hwc(image, shape)  # -> H×W×C, or a clear shape error
    lo, hi = estimate_percentiles(np.moveaxis(image, -1, 0))
    image = (image[..., :3].astype(np.float32) - lo) / (hi - lo)
    return image if image.shape[-1] in (1, 3) else image[..., :1]


def overlay_outlines(image: np.ndarray, labels: np.ndarray, alpha: float = 0.0, seed: int = 0,
                     chunk_rows: int = 128) -> np.ndarray:
    """uint8 H×W×3: each object's outline in its own colour over the normalised image
    (``alpha`` > 0 also tints the inside), as :func:`cellrcnn.viz.overlay_labels` draws it.

    Built ``chunk_rows`` rows at a time (with a halo as wide as the outline, so every outline is
    the whole image's): besides the uint8 result, memory stays at a few bytes per pixel of one
    chunk, not full-image float arrays (an 8000 × 8000 overlay used to add about 2.8 GB)."""
    from cellrcnn.viz import bright_colors, outline_width, outlines, to_rgb

    labels = np.asarray(labels)
    h, w = labels.shape
    raw = as_hwc(image, (h, w))  # a view of the raw pixels
    lo, hi = estimate_percentiles(np.moveaxis(raw, -1, 0))
    n = int(labels.max()) if labels.size else 0
    colors = bright_colors(n, seed)
    width = outline_width(labels.shape)
    rgb = np.empty((h, w, 3), np.uint8)
    for y0 in range(0, h, chunk_rows):
        y1 = min(h, y0 + chunk_rows)
        a0, a1 = max(0, y0 - width), min(h, y1 + width)
        part = (raw[y0:y1, :, :3].astype(np.float32) - lo) / (hi - lo)
        tile = to_rgb(part if part.shape[-1] in (1, 3) else part[..., :1])
        halo = labels[a0:a1].astype(np.int64)
        lab = halo[y0 - a0 : y1 - a0]
        if alpha > 0:
            inside = lab > 0
            blend = tile.astype(np.float32)
            blend[inside] = (1 - alpha) * blend[inside] + alpha * colors[lab[inside]]
            tile = blend.astype(np.uint8)
        edge = outlines(halo, width)[y0 - a0 : y1 - a0]
        tile[edge] = colors[lab[edge]].astype(np.uint8)
        rgb[y0:y1] = tile
    return rgb


def write_overlay_png(path: str | Path, image: np.ndarray, labels: np.ndarray, **kwargs) -> Path:
    """Write :func:`overlay_outlines` as a PNG (OpenCV encodes row by row from the array itself:
    no second full-size copy, as Pillow's RGB conversion made)."""
    import cv2

    bgr = overlay_outlines(image, labels, **kwargs)
    red = bgr[..., 0].copy()
    bgr[..., 0] = bgr[..., 2]  # RGB -> BGR in place, one channel of scratch
    bgr[..., 2] = red
    del red
    # fast zlib level: at 4096×4096 level 6 took 8 s against 3 s, for a similar file size

    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"{path}: could not write the overlay PNG")

    return atomic_write(path, write)
