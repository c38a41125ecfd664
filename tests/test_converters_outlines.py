"""Outline-drawing converters (BBBC007, BBBC009, BBBC018, CHO): interiors become instances;
the border-touching background, open (border-cut) cells and stroke gaps are dropped."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from cellrcnn.data.converters import bbbc007, bbbc009, bbbc018, cho
from cellrcnn.data.converters.instances import outline_pixels
from cellrcnn.data.converters.validate import validate

H, W = 40, 50


def drawing() -> tuple[np.ndarray, list[np.ndarray]]:
    """Outline (bool H×W) of two touching cells sharing a stroke, a 4-px stroke gap and a cell
    cut open by the border; and the two interiors expected back. Components: background and
    the open cell (both touch the border), the gap, the two cells."""
    outline = np.zeros((H, W), bool)
    outline[4, 4:27] = outline[15, 4:27] = True
    outline[4:16, 4] = outline[4:16, 15] = outline[4:16, 26] = True  # column 15 is shared
    outline[20, 30:34] = outline[23, 30:34] = outline[20:24, 30] = outline[20:24, 33] = True  # 2×2 gap
    outline[30, 0:10] = outline[30:40, 10] = True  # open cell at the bottom-left border
    a = np.zeros((H, W), bool)
    a[5:15, 5:15] = True
    b = np.zeros((H, W), bool)
    b[5:15, 16:26] = True
    return outline, [a, b]


def grown(mask: np.ndarray, outline: np.ndarray) -> np.ndarray:
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)
    return mask | (cv2.dilate(mask.astype(np.uint8), cross).astype(bool) & outline)


def decoded(out: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    found = {}
    for split in ("train", "val", "test"):
        doc = json.loads((out / "annotations" / f"{split}.json").read_text())
        for img in doc["images"]:
            found[img["file_name"]] = [
                (a["category_id"], mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"]
                                                      .encode()}).astype(bool))
                for a in doc["annotations"] if a["image_id"] == img["id"]]
    return found


def tif_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def assert_cells(instances, category: int, outline=None) -> None:
    _, want = drawing()
    if outline is not None:
        want = [grown(m, outline) for m in want]
    assert [c for c, _ in instances] == [category] * 2
    for (_, got), ref in zip(instances, want, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_bbbc007_channels_rgb_and_names_with_spaces(tmp_path, capsys):
    outline, _ = drawing()
    grey = np.tile(np.arange(W, dtype=np.uint8), (H, 1))
    files = {"A9/A9 p10d.tif": tif_bytes(grey), "A9/A9 p10f.tif": tif_bytes(np.dstack([grey] * 3)),
             "f96 (17)/17P1_POS0006_D_1UL.tif": tif_bytes(grey)}
    with zipfile.ZipFile(tmp_path / "BBBC007_v1_images.zip", "w") as zi, \
            zipfile.ZipFile(tmp_path / "BBBC007_v1_outlines.zip", "w") as zo:
        for rel, data in files.items():
            zi.writestr(f"BBBC007_v1_images/{rel}", data)
            zo.writestr(f"BBBC007_v1_outlines/{rel}", tif_bytes(outline.astype(np.uint8) * 255))
    out = bbbc007.convert(tmp_path, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert "3 images, 15 instances read; 6 written (6 touching the border, 3 under 16 px dropped by rule)" in text
    got = decoded(out)
    assert set(got) == {"A9/A9 p10d.tif", "A9/A9 p10f.png", "f96 (17)/17P1_POS0006_D_1UL.tif"}
    assert_cells(got["A9/A9 p10d.tif"], 1)  # DNA -> nucleus
    assert_cells(got["A9/A9 p10f.png"], 2)  # actin -> cell; RGB with equal channels stored as grey PNG
    assert cv2.imread(str(out / "images" / "A9" / "A9 p10f.png"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert validate(out) == []


def test_bbbc009_white_is_zero_one_bit_tiff(tmp_path):
    outline, _ = drawing()
    for folder in ("human_rbc_dic_images", "human_rbc_dic_outlines"):
        (tmp_path / folder).mkdir()
    (tmp_path / "human_rbc_dic_images" / "6hr-001-DIC.tif").write_bytes(tif_bytes(np.full((H, W), 90, np.uint8)))
    path = tmp_path / "human_rbc_dic_outlines" / "6hr-001-DIC.tif"
    path.write_bytes(tif_bytes(outline, photometric="miniswhite"))  # 1-bit, WhiteIsZero
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].bitspersample == 1 and tif.pages[0].photometric == 0
    stored = tifffile.imread(path)
    inverted = np.asarray(Image.open(path))  # Pillow applies WhiteIsZero: outline pixels False
    assert stored[4, 4] and not inverted[4, 4]
    np.testing.assert_array_equal(outline_pixels(stored), outline_pixels(inverted))
    out = bbbc009.convert(tmp_path, tmp_path / "out", workers=1)
    assert_cells(decoded(out)["6hr-001-DIC.tif"], 1)
    dil = bbbc009.convert(tmp_path, tmp_path / "dilated", dilate=True, workers=1)
    assert_cells(decoded(dil)["6hr-001-DIC.tif"], 1, outline=outline)  # cells share column 15
    assert validate(dil) == []


def dib16(arr: np.ndarray) -> bytes:
    """Header-less 16-bit bitmap as in Cellomics .DIB: BITMAPINFOHEADER, rows bottom-up."""
    h, w = arr.shape
    header = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 16, 0, w * h * 2, 0, 0, 0, 0)
    return header + np.ascontiguousarray(arr[::-1]).astype("<u2").tobytes()


def test_bbbc018_dib_orientation_and_pairs(tmp_path, capsys):
    outline, _ = drawing()
    ramp = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 7)  # top-left dark, bottom-right bright
    (tmp_path / "BBBC018_v1_images").mkdir()
    (tmp_path / "BBBC018_v1_outlines").mkdir()
    for well in ("10780", "10779"):
        for channel in ("DNA", "actin", "pH3"):
            (tmp_path / "BBBC018_v1_images" / f"{well}-{channel}.DIB").write_bytes(dib16(ramp))
    for kind in ("nuclei", "cells"):
        Image.fromarray(outline).convert("1").save(tmp_path / "BBBC018_v1_outlines" / f"10780-{kind}.png")
    out = bbbc018.convert(tmp_path, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert "well 10779 has no annotation" in text and "skipped" not in text
    got = decoded(out)
    assert set(got) == {"10780-DNA.png", "10780-actin.png"}
    assert_cells(got["10780-DNA.png"], 1)
    assert_cells(got["10780-actin.png"], 2)
    np.testing.assert_array_equal(cv2.imread(str(out / "images" / "10780-DNA.png"), cv2.IMREAD_UNCHANGED), ramp)
    assert validate(out) == []


def test_cho_outline_folder_and_missing_outline(tmp_path, capsys):
    outline, _ = drawing()
    (tmp_path / "images").mkdir()
    (tmp_path / "ground_truth").mkdir()
    rgb = np.dstack([np.full((H, W), v, np.uint8) for v in (10, 20, 30)])
    for name in ("cho01", "cho02"):
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), rgb)
    cv2.imwrite(str(tmp_path / "ground_truth" / "cho01.png"), outline.astype(np.uint8) * 255)
    out = cho.convert(tmp_path, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert "cho02.png: no outline" in text
    got = decoded(out)
    assert list(got) == ["cho01.png"]
    assert_cells(got["cho01.png"], 1)
    assert (out / "images" / "cho01.png").read_bytes() == (tmp_path / "images" / "cho01.png").read_bytes()
