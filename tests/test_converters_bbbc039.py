"""BBBC039 converter: 16-bit TIFFs, colour-coded (graph-coloured) masks of touching nuclei,
official split files; read from the three official zips."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import tifffile
from pycocotools import mask as mask_utils

from cellrcnn.data.converters import bbbc039
from cellrcnn.data.converters.validate import validate

STEMS = [f"IXMtest_A0{i}_s1_w1051DAA7C-7042-435F-99F0-1E847D9B42C{i}" for i in (1, 2, 3)]


def nuclei(k: int) -> list[np.ndarray]:
    """Image k's nuclei as 20×24 masks: two touching squares (different colours), and one more
    touching the second that reuses colour 1 (allowed: it does not touch the first)."""
    out = []
    for y0, x0, y1, x1 in [(2, 2, 8, 8), (2, 8, 8, 14), (8, 8 + k, 14, 14 + k)]:
        m = np.zeros((20, 24), bool)
        m[y0:y1, x0:x1] = True
        out.append(m)
    return out if k != 3 else []  # the third image has no nuclei


def rgba_mask(masks: list[np.ndarray]) -> np.ndarray:
    colours = [1, 2, 1]
    red = np.zeros((20, 24), np.uint8)
    for m, c in zip(masks, colours, strict=False):
        red[m] = c
    return np.dstack([red, np.zeros_like(red), np.zeros_like(red), np.full_like(red, 255)])


def make_source(root: Path) -> Path:
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / "images.zip", "w") as zi, zipfile.ZipFile(root / "masks.zip", "w") as zm:
        zi.writestr("images/", b"")
        for k, stem in enumerate(STEMS, start=1):
            buf = io.BytesIO()
            tifffile.imwrite(buf, (np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) + 110 * k))
            zi.writestr(f"images/{stem}.tif", buf.getvalue())
            rgba = rgba_mask(nuclei(k))
            zm.writestr(f"masks/{stem}.png", cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes())
    with zipfile.ZipFile(root / "metadata.zip", "w") as zd:
        zd.writestr("metadata/training.txt", f"{STEMS[0]}.png\n")  # lines may carry an extension
        zd.writestr("metadata/validation.txt", f"{STEMS[1]}\n")
        zd.writestr("metadata/test.txt", f"{STEMS[2]}.tif\n\n")
        zd.writestr("metadata/filenames_and_plates.csv", "x,1\n")
    return root


def test_colour_components_keep_touching_nuclei_apart(tmp_path, capsys):
    out = bbbc039.convert(make_source(tmp_path / "bbbc039"), tmp_path / "out", workers=1)
    assert "3 images, 6 instances read; 6 written" in capsys.readouterr().out
    splits = {s: json.loads((out / "annotations" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert [d["images"][0]["file_name"] for d in splits.values()] == [f"{s}.tif" for s in STEMS]
    assert splits["test"]["annotations"] == []  # an image without nuclei is still listed
    for k, split in ((1, "train"), (2, "val")):
        got = [mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}).astype(bool)
               for a in splits[split]["annotations"]]
        want = nuclei(k)
        assert len(got) == 3
        # every source nucleus is matched exactly by one instance
        assert sorted(int(np.argmax([np.array_equal(g, w) for g in got])) for w in want) == [0, 1, 2]
        assert all(any(np.array_equal(g, w) for g in got) for w in want)
    img = tifffile.imread(out / "images" / f"{STEMS[0]}.tif")
    assert img.dtype == np.uint16 and img.shape == (20, 24)  # copied, still 16-bit
    assert validate(out) == []


def test_missing_mask_is_reported(tmp_path, capsys):
    src = make_source(tmp_path / "bbbc039")
    with zipfile.ZipFile(src / "masks.zip") as z:
        keep = {n: z.read(n) for n in z.namelist() if STEMS[1] not in n}
    with zipfile.ZipFile(src / "masks.zip", "w") as z:
        for n, d in keep.items():
            z.writestr(n, d)
    bbbc039.convert(src, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert f"masks/{STEMS[1]}.png: missing mask" in text
    assert "3 images" in text and "2 images" not in text.split("\n")[0]
