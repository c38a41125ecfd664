"""BBBC041 malaria boxes: box-only annotations, categories (difficult mapped explicitly),
leading-slash pathnames, conversion with and without the image files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellrcnn.data.converters import bbbc041
from cellrcnn.data.converters.common import ConversionError
from cellrcnn.data.converters.validate import validate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def entry(name: str, boxes: list[tuple[int, int, int, int, str]], ext: str = "png") -> dict:
    return {"image": {"checksum": "0" * 32, "pathname": f"/images/{name}.{ext}", "shape": {"r": 30, "c": 40, "channels": 3}},
            "objects": [{"bounding_box": {"minimum": {"r": r0, "c": c0}, "maximum": {"r": r1, "c": c1}}, "category": cat}
                        for r0, c0, r1, c1, cat in boxes]}


def make_malaria(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    train = [entry("t1", [(2, 3, 12, 15, "red blood cell"), (5, 20, 25, 38, "difficult")]),
             entry("t2", [(0, 0, 30, 40, "leukocyte")])]
    test = [entry("u1", [(1, 1, 9, 9, "ring"), (10, 10, 20, 30, "red blood cell")], ext="jpg")]
    (root / "training.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    for name, ext in (("t1", "png"), ("t2", "png"), ("u1", "jpg"), ("extra", "png")):  # extra: unlabelled
        cv2.imwrite(str(root / "images" / f"{name}.{ext}"), np.full((30, 40, 3), 128, np.uint8))
    return root


def test_boxes_categories_and_images(tmp_path, capsys):
    out = bbbc041.convert(make_malaria(tmp_path / "malaria"), tmp_path / "out", splits="50,50,0")
    assert "3 images, 5 instances read; 5 written" in capsys.readouterr().out
    docs = {s: json.loads((out / "annotations" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    cats = {c["name"]: c["id"] for c in docs["test"]["categories"]}
    assert cats["red blood cell"] == 1 and cats["difficult"] == 7 and len(cats) == 7
    assert [i["file_name"] for i in docs["test"]["images"]] == ["u1.jpg"]
    assert sorted(i["file_name"] for s in ("train", "val") for i in docs[s]["images"]) == ["t1.png", "t2.png"]
    ring = next(a for a in docs["test"]["annotations"] if a["category_id"] == cats["ring"])
    assert ring["bbox"] == [1.0, 1.0, 8.0, 8.0] and "segmentation" not in ring
    assert sorted(p.name for p in (out / "images").iterdir()) == ["t1.png", "t2.png", "u1.jpg"]  # JSON, not folder
    assert validate(out) == []


def test_difficult_drop_and_missing_images(tmp_path, capsys):
    src = make_malaria(tmp_path / "malaria")
    (src / "images" / "t2.png").unlink()
    out = bbbc041.convert(src, tmp_path / "out", difficult="drop")
    text = capsys.readouterr().out
    assert "3 images, 5 instances read; 3 written (1 'difficult' dropped by rule)" in text
    assert "t2.png: FileNotFoundError: image missing" in text
    assert "difficult" not in {c["name"] for c in json.loads((out / "annotations" / "train.json").read_text())["categories"]}
    with pytest.raises(ConversionError, match="t2.png"):
        bbbc041.convert(src, tmp_path / "strict", strict=True)


@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "bbbc041" / "test.json").is_file(), reason="../shared/data absent")
def test_real_test_json_without_images(tmp_path, capsys):
    out = bbbc041.convert(DATA / "bbbc041" / "test.json", tmp_path / "out", images=False)
    assert "120 images, 5,922 instances read; 5,922 written" in capsys.readouterr().out
    doc = json.loads((out / "annotations" / "test.json").read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    assert len(doc["images"]) == 120 and {(i["height"], i["width"]) for i in doc["images"]} == {(1383, 1944)}
    assert Counter(names[a["category_id"]] for a in doc["annotations"]) == {
        "red blood cell": 5614, "ring": 169, "trophozoite": 111, "gametocyte": 12, "schizont": 11, "difficult": 5}
    assert doc["info"]["annotation_only"] is True
    assert validate(out) == []
