"""Per-cell measurements from a label image: the table researchers count, plot and test.

Column names carry their unit, so a CSV stays unambiguous once it leaves Python:

- ``image``, ``label``: the image name and the object's value in the label image.
- ``centroid_x_px``, ``centroid_y_px``: always in pixels (x = column, y = row), to find the cell
  in the image and in every export; with ``pixel_size`` also ``centroid_x_um``, ``centroid_y_um``.
- Sizes in pixels (``area_px``, ``perimeter_px``, ``equivalent_diameter_px``,
  ``major_axis_length_px``, ``minor_axis_length_px``), or, when ``pixel_size`` (µm per pixel) is
  given, in micrometres instead (``area_um2``, ``perimeter_um``, ``equivalent_diameter_um``, ...).
- Unitless shape: ``aspect_ratio`` (major / minor axis of the object's pixels taken as unit
  squares, so a 1×n line has n and a single pixel 1 rather than infinity), ``eccentricity`` (of the ellipse with
  the same second moments), ``solidity`` (area / convex area), ``circularity`` (4πA/P², 1 for a
  disk; clipped to 1 as ImageJ does, since perimeters of tiny objects are underestimated).
- ``mean_intensity_c{k}``, ``max_intensity_c{k}``, ``integrated_intensity_c{k}`` (sum over the
  object's pixels, e.g. DNA content per nucleus) per channel k, in raw image units (no
  normalisation: a 16-bit image gives 16-bit values), when ``image_raw`` is given.
- ``score``: the model's confidence for the object (NaN when unknown).

Perimeter is the Crofton estimate (scikit-image ``perimeter_crofton``, 4 directions): within 1 % of
2πr for digital disks of radius >= 10 px and 3 % at 5 px, while straight axis-aligned edges come
out about 6 % short (it averages over orientations; the boundary-pixel count over-estimates disks
by 3-4 % instead, which matters more for round cells). ``df.attrs`` keeps ``pixel_size_um`` and
``image_shapes`` for :func:`summarize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

from cellrcnn.io import as_hwc

_LENGTHS = ("perimeter", "equivalent_diameter", "major_axis_length", "minor_axis_length")
_SKIMAGE = {
    "perimeter": "perimeter_crofton",
    "equivalent_diameter": "equivalent_diameter_area",
    "major_axis_length": "axis_major_length",
    "minor_axis_length": "axis_minor_length",
}


def _score_column(scores, labels: np.ndarray) -> np.ndarray:
    if scores is None:
        return np.full(len(labels), np.nan)
    if isinstance(scores, Mapping) or isinstance(scores, pd.Series):
        return np.array([float(scores.get(int(k), np.nan)) for k in labels])
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(labels) and labels.max() > len(scores):
        raise ValueError(f"scores has {len(scores)} values but the label image holds label {labels.max()}; "
                         "pass scores[k - 1] for label k, or a {label: score} mapping")
    return scores[labels - 1]


def measure(
    labels: np.ndarray,
    image_raw: np.ndarray | None = None,
    image_name: str = "",
    scores: Sequence[float] | Mapping[int, float] | np.ndarray | None = None,
    pixel_size: float | None = None,
) -> pd.DataFrame:
    """One row per object of a label image (2-D ints, 0 = background); columns in the module doc.

    Args:
        labels: H×W label image.
        image_raw: the raw image (H×W, H×W×C or C×H×W) for per-channel intensities, or None.
        image_name: written to the ``image`` column (use the file name, to pool many images).
        scores: per-object confidence: ``scores[k - 1]`` for label k, or a ``{label: score}`` map.
        pixel_size: micrometres per pixel; switches sizes to µm and µm².
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{image_name or 'labels'}: a label image must be 2-D, got shape {labels.shape}")
    if pixel_size is not None and not pixel_size > 0:
        raise ValueError(f"pixel_size must be a positive number of µm per pixel, got {pixel_size}")
    props = ["label", "centroid", "area", "perimeter_crofton", "equivalent_diameter_area", "axis_major_length",
             "axis_minor_length", "eccentricity", "solidity"]
    intensity = None
    if image_raw is not None:
        intensity = as_hwc(image_raw, labels.shape)
        props += ["intensity_mean", "intensity_max"]
    n_channels = 0 if intensity is None else intensity.shape[-1]
    if labels.max(initial=0) > 0:
        ints = labels if labels.dtype.kind in "iu" else labels.astype(np.int64)  # no copy of uint32 labels
        raw = regionprops_table(ints, intensity_image=intensity, properties=props)
    else:
        raw = {p: np.zeros(0) for p in ["label", "centroid-0", "centroid-1", *props[2:9]]}
        for c in range(n_channels):
            raw[f"intensity_mean-{c}"] = raw[f"intensity_max-{c}"] = np.zeros(0)
    ids = np.asarray(raw["label"], dtype=np.int64)
    area = np.asarray(raw["area"], dtype=np.float64)
    perimeter = np.asarray(raw["perimeter_crofton"], dtype=np.float64)
    major = np.asarray(raw["axis_major_length"], dtype=np.float64)
    minor = np.asarray(raw["axis_minor_length"], dtype=np.float64)
    table: dict[str, object] = {
        "image": np.full(len(ids), image_name, dtype=object),
        "label": ids,
        "centroid_x_px": np.asarray(raw["centroid-1"], dtype=np.float64),
        "centroid_y_px": np.asarray(raw["centroid-0"], dtype=np.float64),
    }
    s = 1.0 if pixel_size is None else float(pixel_size)
    unit = "px" if pixel_size is None else "um"
    if pixel_size is not None:
        table["centroid_x_um"] = table["centroid_x_px"] * s
        table["centroid_y_um"] = table["centroid_y_px"] * s
    table["area_px" if pixel_size is None else "area_um2"] = area * s * s
    for name in _LENGTHS:
        table[f"{name}_{unit}"] = np.asarray(raw[_SKIMAGE[name]], dtype=np.float64) * s
    with np.errstate(divide="ignore", invalid="ignore"):
        # axis = 4·sqrt(second moment) of the pixel centres; a pixel's own extent adds 1/12 to
        # each moment (a unit square's), which keeps one-pixel-wide objects finite
        table["aspect_ratio"] = np.sqrt((major**2 / 16 + 1 / 12) / (minor**2 / 16 + 1 / 12))
        table["eccentricity"] = np.asarray(raw["eccentricity"], dtype=np.float64)
        table["solidity"] = np.asarray(raw["solidity"], dtype=np.float64)
        circ = np.where(perimeter > 0, 4 * np.pi * area / np.where(perimeter > 0, perimeter, 1) ** 2, 1.0)
    table["circularity"] = np.minimum(circ, 1.0)
    for c in range(n_channels):
        suffix = "" if n_channels == 1 and "intensity_mean" in raw else f"-{c}"
        table[f"mean_intensity_c{c}"] = np.asarray(raw[f"intensity_mean{suffix}"], dtype=np.float64)
        table[f"max_intensity_c{c}"] = np.asarray(raw[f"intensity_max{suffix}"], dtype=np.float64)
        table[f"integrated_intensity_c{c}"] = table[f"mean_intensity_c{c}"] * area  # sum over the pixels
    table["score"] = _score_column(scores, ids)
    df = pd.DataFrame(table)
    df.attrs["pixel_size_um"] = pixel_size
    df.attrs["image_shapes"] = {image_name: tuple(int(v) for v in labels.shape)}
    return df


def _area_column(table: pd.DataFrame) -> str:
    for name in ("area_um2", "area_px"):
        if name in table.columns:
            return name
    raise KeyError("the table has neither an area_px nor an area_um2 column; is it from measure()?")


def summarize(
    table: pd.DataFrame,
    image_shapes: Mapping[str, tuple[int, int]] | None = None,
    pixel_size: float | None = None,
) -> pd.DataFrame:
    """Per-image summary of a measurement table: one row per ``image``.

    Columns: ``image``, ``count``, mean/median area and its std (in the table's unit), mean
    circularity, mean score, ``n_anomalous`` when the table was scored for anomalies, and the
    density: ``density_per_mm2`` when the pixel size is known (argument or ``table.attrs``),
    else ``density_per_megapixel``. Densities need each image's H×W: ``image_shapes`` or the
    ``attrs`` that :func:`measure` sets (lost after ``pd.concat`` of different images; pass
    ``image_shapes`` then). Images with no object do not appear in the table; pass them in
    ``image_shapes`` to get a row with count 0.
    """
    shapes = dict(table.attrs.get("image_shapes") or {})
    shapes.update(image_shapes or {})
    pixel_size = pixel_size if pixel_size is not None else table.attrs.get("pixel_size_um")
    area = _area_column(table)
    unit = area.split("_", 1)[1]
    names = list(dict.fromkeys([*table["image"].tolist(), *shapes.keys()]))
    groups = table.groupby("image", sort=False)
    rows = []
    for name in names:
        g = groups.get_group(name) if name in groups.groups else table.iloc[:0]
        row = {
            "image": name,
            "count": len(g),
            f"mean_area_{unit}": g[area].mean(),
            f"median_area_{unit}": g[area].median(),
            f"std_area_{unit}": g[area].std(),
            "mean_circularity": g["circularity"].mean() if "circularity" in g else np.nan,
            "mean_score": g["score"].mean() if "score" in g else np.nan,
        }
        if "is_anomalous" in g:
            row["n_anomalous"] = int(g["is_anomalous"].sum())
        if name in shapes:
            h, w = shapes[name]
            if pixel_size:
                row["density_per_mm2"] = len(g) / (h * w * (pixel_size * 1e-3) ** 2)
            else:
                row["density_per_megapixel"] = len(g) / (h * w / 1e6)
        rows.append(row)
    return pd.DataFrame(rows)


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as CSV (``.csv``), TSV (``.tsv``) or Parquet (``.parquet``, needs pyarrow),
    atomically and never over an input file (:func:`cellrcnn.io.atomic_write`)."""
    from cellrcnn.io import atomic_write

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow); "
                              "or write .csv instead") from exc
        return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    if suffix in (".csv", ".tsv"):
        return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, sep="," if suffix == ".csv" else "\t"))
    raise ValueError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv or .parquet")
