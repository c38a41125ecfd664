"""Annotations with impossible geometry or broken RLE: validate reports every one (naming the
file and the annotation id) within a memory budget; the training dataset refuses them at start."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellrcnn.data.coco import CocoFormatError, CocoInstanceDataset
from cellrcnn.data.masks import encode_rle

from .conftest import run_limited

H, W = 20, 24


def good_rle() -> dict:
    mask = np.zeros((H, W), np.uint8)
    mask[3:9, 4:12] = 1
    mask[12:15, 15:20] = 1
    return encode_rle(mask)


BAD = {
    11: [[1.0, 1.0, float("nan"), 5.0, 9.0, 9.0]],  # NaN: validate grew to 22 GB, training segfaulted
    12: [[1.0, 1.0, 1e30, 5.0, 9.0, 1e30]],  # huge coordinate
    13: {"size": [H, W], "counts": "\x7f\x7f broken \x00"},  # corrupt compressed RLE (pycocotools ValueError)
    14: {"size": [H, W], "counts": good_rle()["counts"][:-3]},  # truncated: a partial mask, silently
    15: {"size": [H, W], "counts": [5, 10, 20]},  # uncompressed, short
    16: [["1", None, 3, 4, 5, 6]],  # not numbers
}


def write_set(root: Path, segmentations: dict) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "images" / "a.png")
    anns = [{"id": i, "image_id": 1, "category_id": 1, "segmentation": seg, "bbox": [1.0, 1.0, 8.0, 8.0],
             "area": 64.0, "iscrowd": 0} for i, seg in segmentations.items()]
    doc = {"info": {"source": "t", "licence": "x", "description": "hand-made"}, "categories": [{"id": 1, "name": "n"}],
           "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}], "annotations": anns}
    (root / "annotations" / "train.json").write_text(json.dumps(doc))  # NaN is written as the JSON literal NaN
    return root / "annotations" / "train.json"


def test_validate_reports_every_bad_annotation_within_a_memory_budget(tmp_path):
    write_set(tmp_path / "set", BAD)
    proc = run_limited(f"""
        from cellrcnn.data.converters.validate import validate
        limit_memory(500)
        for line in validate({str(tmp_path / 'set')!r}):
            print(line)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for ann_id, reason in ((11, "NaN or infinite"), (12, "outside"), (13, "invalid character"),
                           (14, "truncated"), (15, "covers 35 pixels"), (16, "non-number")):
        hits = [line for line in lines if f"annotation {ann_id} (a.png)" in line]
        assert hits and reason in hits[0], (ann_id, lines)
        assert hits[0].startswith("annotations/train.json")


def test_training_dataset_refuses_each_bad_mask_naming_file_and_annotation(tmp_path):
    paths = {ann_id: write_set(tmp_path / f"set{ann_id}", {1: good_rle(), ann_id: seg}) for ann_id, seg in BAD.items()}
    proc = run_limited(f"""
        from cellrcnn.data.coco import CocoFormatError, CocoInstanceDataset
        limit_memory(500)
        for path in {[str(p) for p in paths.values()]!r}:
            try:
                CocoInstanceDataset(path)[0]
                print("ACCEPTED", path)
            except CocoFormatError as exc:
                print("REFUSED", exc)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ACCEPTED" not in proc.stdout
    for ann_id, path in paths.items():
        assert f"REFUSED {path}: annotation {ann_id}:" in proc.stdout


def test_good_rle_still_decodes(tmp_path):
    path = write_set(tmp_path / "set", {1: good_rle()})
    _, target = CocoInstanceDataset(path)[0]
    assert target["masks"].shape == (1, H, W) and int(target["masks"].sum()) == 48 + 15


def test_all_empty_annotations_are_said_out_loud(tmp_path):
    path = write_set(tmp_path / "set", {})
    with pytest.warns(UserWarning, match="no object annotations"):
        CocoInstanceDataset(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CocoFormatError, match="not valid JSON"):
            (tmp_path / "bad.json").write_text("{")
            CocoInstanceDataset(tmp_path / "bad.json")
