"""LIVECell: annotations as an object keyed by id strings, polygons -> RLE, validation."""

from __future__ import annotations

import json

import numpy as np
import tifffile
from pycocotools import mask as mask_utils

from cellrcnn.data.converters import livecell
from cellrcnn.data.converters.validate import validate
from cellrcnn.data.masks import mask_to_bbox

H, W = 20, 30


def doc(split: str) -> dict:
    images = [{"id": 7, "file_name": f"A172_Phase_C7_1_02d16h00m_{split}.tif", "height": H, "width": W}]
    polygon = [2, 2, 12, 2, 12, 8, 2, 8]  # x, y pairs: a 10×6 rectangle
    anns = {"11": {"id": "11", "image_id": 7, "category_id": 1, "segmentation": [polygon], "area": 1.0,
                   "bbox": [0, 0, 1, 1], "iscrowd": 0},
            "12": {"id": "12", "image_id": 7, "category_id": 1, "segmentation": [polygon], "area": 60,
                   "bbox": [2, 2, 10, 6], "iscrowd": 0},  # duplicate overlapping cell: kept
            "13": {"id": "13", "image_id": 99, "category_id": 1, "segmentation": [polygon], "area": 60,
                   "bbox": [2, 2, 10, 6], "iscrowd": 0}}  # unknown image: reported
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cell"}]}


def test_dict_annotations_normalised(tmp_path, capsys):
    ann_dir = tmp_path / "annotations" / "LIVECell"
    ann_dir.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (ann_dir / f"livecell_coco_{split}.json").write_text(json.dumps(doc(split)))
        folder = "livecell_test_images" if split == "test" else "livecell_train_val_images"
        img_dir = tmp_path / "images" / folder / "A172"
        img_dir.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(img_dir / f"A172_Phase_C7_1_02d16h00m_{split}.tif", np.full((H, W), 128, np.uint8))
    out = livecell.convert(tmp_path, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert "3 images, 9 instances read; 6 written" in text and "annotation 13: unknown image_id 99" in text
    for split in ("train", "val", "test"):
        d = json.loads((out / "annotations" / f"{split}.json").read_text())
        assert isinstance(d["annotations"], list) and len(d["annotations"]) == 2
        assert d["images"][0]["file_name"].endswith(f"_{split}.tif") and d["images"][0]["source_id"] == 7
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[2, 2, 12, 2, 12, 8, 2, 8]], H, W)))
        for a in d["annotations"]:  # area and box recomputed from the rasterised mask, not copied
            assert isinstance(a["id"], int) and a["bbox"] == mask_to_bbox(ref) and a["area"] == int(ref.sum()) == 60
            m = mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})
            np.testing.assert_array_equal(m, ref)
    assert validate(out) == []
    ann_only = livecell.convert(ann_dir / "livecell_coco_val.json", tmp_path / "ann_only", images=False, workers=1)
    assert len(json.loads((ann_only / "annotations" / "val.json").read_text())["annotations"]) == 2
