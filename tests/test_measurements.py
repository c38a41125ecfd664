"""Per-cell measurements on shapes whose size, outline, axes, centroid and intensity are known."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk, ellipse

from cellrcnn.inference.measurements import measure, summarize, write_table


@pytest.fixture(scope="module")
def shapes() -> tuple[np.ndarray, np.ndarray]:
    """Labels: 1 disk r=30 at (row 60, col 70); 2 ellipse semi-axes 20 (rows) × 40 (cols) at (170, 200);
    3 square 20×20 at rows 20:40, cols 200:220. Raw 2-channel uint16 image, constant per object."""
    labels = np.zeros((240, 320), np.int32)
    labels[disk((60, 70), 30)] = 1
    labels[ellipse(170, 200, 20, 40)] = 2
    labels[20:40, 200:220] = 3
    raw = np.zeros((*labels.shape, 2), np.uint16)
    raw[..., 0] = np.array([5, 1000, 2000, 3000], np.uint16)[labels]
    raw[..., 1] = 40000
    raw[60, 70, 1] = 50000  # one bright pixel: max differs from mean in object 1 only
    return labels, raw


def test_geometry_of_known_shapes(shapes):
    labels, raw = shapes
    df = measure(labels, raw, "field.tif", scores=[0.9, 0.8, 0.7]).set_index("label")
    assert list(df.index) == [1, 2, 3] and (df["image"] == "field.tif").all()
    for k in (1, 2, 3):
        assert df.loc[k, "area_px"] == (labels == k).sum()  # exact pixel counts
        r_eq = np.sqrt(df.loc[k, "area_px"] / np.pi)
        assert df.loc[k, "equivalent_diameter_px"] == pytest.approx(2 * r_eq)
    # centroids exact for symmetric shapes; x = column, y = row
    assert (df.loc[1, "centroid_x_px"], df.loc[1, "centroid_y_px"]) == pytest.approx((70, 60))
    assert (df.loc[2, "centroid_x_px"], df.loc[2, "centroid_y_px"]) == pytest.approx((200, 170))
    assert (df.loc[3, "centroid_x_px"], df.loc[3, "centroid_y_px"]) == pytest.approx((209.5, 29.5))
    # disk: perimeter within 2 % of 2πr (Crofton), circular, convex
    r_disk = np.sqrt(df.loc[1, "area_px"] / np.pi)
    assert df.loc[1, "perimeter_px"] == pytest.approx(2 * np.pi * r_disk, rel=0.02)
    assert df.loc[1, "circularity"] > 0.97 and df.loc[1, "solidity"] > 0.98
    assert df.loc[1, "aspect_ratio"] == pytest.approx(1.0, abs=0.01) and df.loc[1, "eccentricity"] < 0.1
    # ellipse: axes 80 and 40 px within 2 %, eccentricity sqrt(1 - (b/a)^2) = 0.866
    assert df.loc[2, "major_axis_length_px"] == pytest.approx(80, rel=0.02)
    assert df.loc[2, "minor_axis_length_px"] == pytest.approx(40, rel=0.02)
    assert df.loc[2, "aspect_ratio"] == pytest.approx(2.0, rel=0.03)
    assert df.loc[2, "eccentricity"] == pytest.approx(np.sqrt(0.75), abs=0.01)
    # Ramanujan's ellipse perimeter ≈ 193.8 px
    a, b = 40, 20
    ramanujan = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
    assert df.loc[2, "perimeter_px"] == pytest.approx(ramanujan, rel=0.03)
    # square 20 px: solidity 1, Crofton perimeter within 8 % of the 80 px edge length
    assert df.loc[3, "solidity"] == pytest.approx(1.0)
    assert df.loc[3, "perimeter_px"] == pytest.approx(80, rel=0.08)
    assert np.all(df["circularity"] <= 1.0)


def test_intensities_per_channel_in_raw_units(shapes):
    labels, raw = shapes
    df = measure(labels, raw).set_index("label")
    assert list(df["mean_intensity_c0"]) == [1000, 2000, 3000]
    assert list(df["max_intensity_c0"]) == [1000, 2000, 3000]
    n1 = (labels == 1).sum()
    assert df.loc[1, "mean_intensity_c1"] == pytest.approx((40000 * (n1 - 1) + 50000) / n1)
    assert list(df["max_intensity_c1"]) == [50000, 40000, 40000]
    np.testing.assert_allclose(df["integrated_intensity_c0"], [1000 * n1, 2000 * (labels == 2).sum(), 3000 * 400])
    # channel-first input gives the same; a single channel gives c0 only
    chw = measure(labels, np.moveaxis(raw, -1, 0)).set_index("label")
    pd.testing.assert_frame_equal(chw, df)
    grey = measure(labels, raw[..., 0])
    assert "mean_intensity_c0" in grey and "mean_intensity_c1" not in grey
    with pytest.raises(ValueError, match="does not match"):
        measure(labels, raw[:100])


def test_micrometre_conversion(shapes):
    labels, raw = shapes
    px = measure(labels, raw).set_index("label")
    um = measure(labels, raw, pixel_size=0.5).set_index("label")
    assert "area_px" not in um and "perimeter_px" not in um
    np.testing.assert_allclose(um["area_um2"], px["area_px"] * 0.25)
    for name in ("perimeter", "equivalent_diameter", "major_axis_length", "minor_axis_length"):
        np.testing.assert_allclose(um[f"{name}_um"], px[f"{name}_px"] * 0.5)
    np.testing.assert_allclose(um["centroid_x_um"], px["centroid_x_px"] * 0.5)
    np.testing.assert_allclose(um["centroid_x_px"], px["centroid_x_px"])  # pixel position kept
    for name in ("aspect_ratio", "eccentricity", "solidity", "circularity", "mean_intensity_c0"):
        np.testing.assert_allclose(um[name], px[name])  # unitless or raw-unit columns unchanged
    assert um.attrs["pixel_size_um"] == 0.5
    with pytest.raises(ValueError, match="pixel_size"):
        measure(labels, pixel_size=0)


def test_scores_by_array_or_mapping_and_missing(shapes):
    labels, _ = shapes
    assert measure(labels, scores={2: 0.5})["score"].tolist()[1] == 0.5
    assert np.isnan(measure(labels)["score"]).all()
    with pytest.raises(ValueError, match="scores"):
        measure(labels, scores=[0.1, 0.2])


def test_empty_label_image_gives_empty_table_with_columns():
    df = measure(np.zeros((10, 10), np.uint16), np.ones((10, 10)), "empty.png")
    assert len(df) == 0 and {"area_px", "circularity", "mean_intensity_c0", "score"} <= set(df.columns)
    summary = summarize(df)
    assert summary.loc[0, "count"] == 0 and summary.loc[0, "density_per_megapixel"] == 0


def test_summarize_counts_and_densities(shapes):
    labels, _ = shapes
    a = measure(labels, image_name="a")
    b = measure(labels[:, :150], image_name="b")  # only the disk
    table = pd.concat([a, b], ignore_index=True)
    summary = summarize(table, image_shapes={"a": labels.shape, "b": (240, 150)}).set_index("image")
    assert summary.loc["a", "count"] == 3 and summary.loc["b", "count"] == 1
    assert summary.loc["a", "mean_area_px"] == pytest.approx(a["area_px"].mean())
    assert summary.loc["a", "density_per_megapixel"] == pytest.approx(3 / (240 * 320 / 1e6))
    um = summarize(measure(labels, image_name="a", pixel_size=0.5))  # shape from attrs
    # 240×320 px at 0.5 µm = 0.0192 mm²
    assert um.loc[0, "density_per_mm2"] == pytest.approx(3 / 0.0192)
    assert "mean_area_um2" in um


def test_write_table_csv_parquet_and_errors(tmp_path, shapes, monkeypatch):
    labels, raw = shapes
    df = measure(labels, raw, "x.tif", pixel_size=0.5)
    back = pd.read_csv(write_table(df, tmp_path / "cells.csv"))
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    back = pd.read_parquet(write_table(df, tmp_path / "out" / "cells.parquet"))
    pd.testing.assert_frame_equal(back, df)
    with pytest.raises(ValueError, match="xlsx"):
        write_table(df, tmp_path / "cells.xlsx")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(ImportError, match="pyarrow"):
        write_table(df, tmp_path / "again.parquet")


def test_aspect_ratio_of_thin_objects_is_finite_and_exact():
    labels = np.zeros((20, 20), np.uint16)
    labels[2, 3:12] = 1  # a 1×9 line: its pixels span 9 × 1 px
    labels[8:10, 3:9] = 2  # a 2×6 bar
    labels[15, 15] = 3  # one pixel
    df = measure(labels).set_index("label")
    assert df.loc[1, "aspect_ratio"] == pytest.approx(9.0)
    assert df.loc[2, "aspect_ratio"] == pytest.approx(3.0)
    assert df.loc[3, "aspect_ratio"] == pytest.approx(1.0)
