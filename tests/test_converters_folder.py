"""Generic folders: Cellpose ``_masks`` pairs, ``_seg.npy``, StarDist images/ + masks/ with splits."""

from __future__ import annotations

import json

import numpy as np
import tifffile
from pycocotools import mask as mask_utils

from cellrcnn.data.converters import folder
from cellrcnn.data.converters.validate import validate


def labels() -> np.ndarray:
    lab = np.zeros((12, 14), np.uint16)
    lab[1:4, 1:4] = 7
    lab[8:10, 10:13] = 7  # label 7 is disconnected: stays one instance
    lab[5:9, 2:6] = 300  # non-consecutive ids
    return lab


def instances(out, split):
    doc = json.loads((out / "annotations" / f"{split}.json").read_text())
    return doc, [mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})
                 for a in doc["annotations"]]


def test_cellpose_masks_and_seg_npy(tmp_path, capsys):
    src = tmp_path / "cp"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", np.ones((12, 14), np.uint16))
    tifffile.imwrite(src / "a_masks.tif", labels())
    tifffile.imwrite(src / "b.tif", np.ones((12, 14), np.uint16))
    np.save(src / "b_seg.npy", {"masks": labels(), "outlines": labels() * 0, "filename": "b.tif"}, allow_pickle=True)
    tifffile.imwrite(src / "c.tif", np.ones((12, 14), np.uint16))  # no labels: reported
    out = folder.convert(src, tmp_path / "out", splits="1,0,0", workers=1, allow_pickle=True)  # trusted files
    text = capsys.readouterr().out
    assert "2 images, 4 instances read; 4 written" in text and "c.tif: no c_masks.*, c_cp_masks.*" in text
    doc, masks = instances(out, "train")
    assert [i["file_name"] for i in doc["images"]] == ["a.tif", "b.tif"]
    lab = labels()
    for k in (0, 2):
        np.testing.assert_array_equal(masks[k], lab == 7)
        np.testing.assert_array_equal(masks[k + 1], lab == 300)
    assert validate(out) == []


def test_stardist_layout_with_official_splits(tmp_path):
    for split in ("train", "test"):
        for sub in ("images", "masks"):
            (tmp_path / "sd" / split / sub).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "sd" / split / "images" / "x.tif", np.ones((12, 14), np.uint8))
        tifffile.imwrite(tmp_path / "sd" / split / "masks" / "x.tif", labels())
    out = folder.convert(tmp_path / "sd", tmp_path / "out", name="mystardist", workers=1)
    doc, masks = instances(out, "test")
    assert [i["file_name"] for i in doc["images"]] == ["test/x.tif"] and len(masks) == 2
    assert doc["info"]["source"] == "mystardist"
    train_val = [json.loads((out / "annotations" / f"{s}.json").read_text())["images"] for s in ("train", "val")]
    assert sum(len(i) for i in train_val) == 1
    assert validate(out) == []
