"""U-Net membrane: binary labels -> 4-connected instances, numeric file order."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellrcnn.data.converters import membrane
from cellrcnn.data.converters.validate import validate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_numeric_names_and_four_connectivity(tmp_path, capsys):
    for sub in ("image", "label"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    label = np.zeros((16, 16), np.uint8)
    label[2:6, 2:6] = 255
    label[6:9, 6:9] = 255  # touches the first only diagonally: a separate cell with 4-connectivity
    label[10:16, 0:16] = 255  # a cell cut by the border is still a cell
    for i in range(11):  # 0..10: lexical order would put 10 before 2
        cv2.imwrite(str(tmp_path / "train" / "image" / f"{i}.png"), np.full((16, 16), i, np.uint8))
        cv2.imwrite(str(tmp_path / "train" / "label" / f"{i}.png"), label)
    out = membrane.convert(tmp_path, tmp_path / "out", splits="1,0,0", workers=1)
    assert "11 images, 33 instances read; 33 written" in capsys.readouterr().out
    doc = json.loads((out / "annotations" / "train.json").read_text())
    assert [i["file_name"] for i in doc["images"]] == [f"{i}.png" for i in range(11)]
    assert [i["id"] for i in doc["images"]] == list(range(1, 12))
    first = [mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})
             for a in doc["annotations"] if a["image_id"] == 1]
    assert sorted(int(m.sum()) for m in first) == [9, 16, 96]
    np.testing.assert_array_equal(sum(first), (label > 0).astype(np.uint8))
    assert validate(out) == []


@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "isbi2012_membrane" / "label").is_dir(), reason="../shared/data absent")
def test_real_membrane_folder(tmp_path, capsys):
    out = membrane.convert(DATA / "isbi2012_membrane", tmp_path / "out", workers=1)
    assert "30 images, 3,431 instances read; 3,431 written" in capsys.readouterr().out
    counts = {}
    for split in ("train", "val", "test"):
        doc = json.loads((out / "annotations" / f"{split}.json").read_text())
        for a in doc["annotations"]:
            counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    assert len(counts) == 30 and min(counts.values()) >= 88 and max(counts.values()) <= 137
    assert validate(out) == []
