"""Sartorius train.csv: row-major RLE (the opposite of the DSB), tested on a non-square image."""

from __future__ import annotations

import json

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from cellrcnn.data.converters import sartorius
from cellrcnn.data.converters.validate import validate
from cellrcnn.data.masks import encode_rle_string

H, W = 13, 21  # non-square: a column-major reading would fail the pixel comparison


def cells() -> list[np.ndarray]:
    a = np.zeros((H, W), np.uint8)
    a[1:4, 2:17] = 1  # a wide run crossing many columns within rows
    b = np.zeros((H, W), np.uint8)
    b[3:10, 15:19] = 1  # overlaps a at (3, 15..16)
    return [a, b]


def test_row_major_rle_non_square(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    cv2.imwrite(str(tmp_path / "train" / "0030fd0e6378.png"), np.full((H, W, 3), 77, np.uint8))  # RGB, equal
    rows = ["id,annotation,width,height,cell_type,plate_time,sample_date,sample_id,elapsed_timedelta"]
    rows += [f"0030fd0e6378,{encode_rle_string(m, order='C')},{W},{H},shsy5y,11h30m00s,2019-06-16,s1,0 days"
             for m in cells()]
    rows.append(f"0030fd0e6378,5 3 9,{W},{H},shsy5y,x,y,s1,0 days")  # broken row: reported by line
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = sartorius.convert(tmp_path, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert "1 images, 3 instances read; 2 written" in text and "train.csv:4 (0030fd0e6378)" in text
    docs = [json.loads((out / "annotations" / f"{s}.json").read_text()) for s in ("train", "val", "test")]
    doc = next(d for d in docs if d["images"])
    assert doc["images"][0]["cell_type"] == "shsy5y" and (doc["images"][0]["height"], doc["images"][0]["width"]) == (H, W)
    got = [mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})
           for a in doc["annotations"]]
    for g, want in zip(got, cells(), strict=True):
        np.testing.assert_array_equal(g, want)
    assert cv2.imread(str(out / "images" / "0030fd0e6378.png"), cv2.IMREAD_UNCHANGED).ndim == 2  # stored grey
    assert validate(out) == []
