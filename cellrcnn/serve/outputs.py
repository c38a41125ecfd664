"""What ``POST /segment`` answers: a JSON summary of one segmentation, or one file made by the
project's exporters (``cellrcnn.inference.exports``, ``cellrcnn.inference.measurements``).

Files are written into the request's temporary folder and read back as bytes, so the exporters
run exactly as in ``predict.py``; the caller deletes the folder before answering.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# format -> (content type, file-name suffix after the image stem, what it is)
FORMATS: dict[str, tuple[str, str, str]] = {
    "tiff": ("image/tiff", "_labels.tif", "label image, uint16 TIFF (uint32 above 65,535 objects)"),
    "png": ("image/png", "_labels.png", "label image, 16-bit PNG"),
    "geojson": ("application/geo+json", ".geojson", "QuPath GeoJSON, one polygon per object, with measurements"),
    "imagej": ("application/zip", "_rois.zip", "Fiji / ImageJ ROI set"),
    "csv": ("text/csv", ".csv", "per-cell measurements"),
    "overlay": ("image/png", "_overlay.png", "object outlines over the image"),
}


def _plain(value):
    """A JSON-safe Python value: numpy scalars unwrapped, NaN and infinities as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_json(result, model: str, downloads_for: str = "/segment") -> dict:
    """The JSON answer: counts, image size, one row per cell, the per-image summary, and the
    download URL of each format (POST the same form there again: the server keeps no results)."""
    from cellrcnn.inference.measurements import summarize

    table = result.table
    summary = summarize(table, image_shapes={result.name: result.labels.shape}, pixel_size=result.pixel_size)
    cells = [{k: _plain(v) for k, v in row.items()} for row in table.to_dict("records")]
    h, w = result.labels.shape
    return {
        "n_objects": result.n_objects,
        "width": int(w),
        "height": int(h),
        "model": result.info.get("model") or model,  # with auto: the model chosen for this image
        "model_choice": result.info.get("model_choice"),  # why auto chose it (None for a named model)
        "image": result.name,
        "pixel_size": result.pixel_size,
        "resize_factor": result.info.get("factor", 1.0),
        "seen_as": result.info.get("seen_as"),  # as is, inverted (dark objects on a bright background), hematoxylin
        # reasons not to trust this result (an image unlike the model's training data), when the model gives them
        "warnings": [str(w) for w in result.info.get("warnings", [])],
        "cells": cells,
        "summary": {k: _plain(v) for k, v in summary.iloc[0].to_dict().items()},
        "downloads": {fmt: f"{downloads_for}?format={fmt}" for fmt in FORMATS},
    }


def render_file(result, fmt: str, folder: Path, stem: str) -> tuple[bytes, str, str]:
    """(file bytes, content type, file name) of one result in format ``fmt``, written in ``folder``."""
    from cellrcnn.inference.exports import write_exports
    from cellrcnn.inference.measurements import write_table

    media_type, suffix, _ = FORMATS[fmt]
    filename = f"{stem}{suffix}"
    if fmt in ("tiff", "geojson", "imagej", "overlay"):
        written = write_exports(folder, stem, result.labels, image_raw=result.image, scores=result.scores,
                                formats=(fmt,), measurements=result.table if fmt == "geojson" else None)
        path = written[fmt]
    elif fmt == "csv":
        path = write_table(result.table, folder / filename)
    else:  # png: 16-bit grey, read by Fiji, napari, Cellpose and skimage.io as the label values
        from PIL import Image

        if result.labels.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(f"{result.n_objects} objects do not fit a 16-bit PNG; ask for format=tiff")
        path = folder / filename
        Image.fromarray(result.labels.astype(np.uint16)).save(path, format="PNG")
    return Path(path).read_bytes(), media_type, filename


def formats_help() -> str:
    """One line per format, for the API description."""
    return "; ".join(f"`{fmt}`: {text}" for fmt, (_, _, text) in FORMATS.items())

