"""MoNuSeg converter: ImageScope XML polygons (1-based float coordinates, overlapping regions),
per-nucleus PNG masks, images from another zip, the official test folder; and on the real
files, the 13 XMLs rasterised against the published per-nucleus PNG masks."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from pycocotools import mask as mask_utils

from cellrcnn.data.converters import monuseg
from cellrcnn.data.converters.common import ConversionError, encode_mask
from cellrcnn.data.converters.validate import validate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg"
H, W = 12, 16


def region(rid: int, xs: tuple[float, float], ys: tuple[float, float]) -> str:
    (x0, x1), (y0, y1) = xs, ys
    vertices = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
    return f'<Region Id="{rid}"><Attributes/><Vertices>{vertices}</Vertices></Region>'


# 1-based coordinates on half pixels: X 3.5..7.5 covers the centres of 0-based columns 3..6
XML = ('<Annotations MicronsPerPixel="0.252700"><Annotation Id="1"><Regions><RegionAttributeHeaders>'
       '<AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>'
       + region(1, (3.5, 7.5), (2.5, 5.5))      # columns 3..6, rows 2..4: 12 px
       + region(2, (6.5, 9.5), (4.5, 8.5))      # columns 6..8, rows 4..7: overlaps region 1 at (4, 6)
       + '<Region Id="3"><Vertices><Vertex X="1" Y="1"/><Vertex X="2" Y="2"/></Vertices></Region>'
       + '</Regions></Annotation></Annotations>')


def rgb() -> np.ndarray:
    return (np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3) * 7) % 251


def decode(ann: dict) -> np.ndarray:
    return mask_utils.decode({**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}).astype(bool)


def all_docs(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / "annotations" / f"{s}.json").read_text()) for s in ("train", "val", "test")}


def test_xml_polygons_rasterised_and_overlaps_kept(tmp_path, capsys):
    src = tmp_path / "MoNuSegTrainingData"
    (src / "Tissue Images").mkdir(parents=True)
    (src / "Annotations").mkdir()
    tifffile.imwrite(src / "Tissue Images" / "TCGA-AA-0001.tif", rgb(), compression="lzw")
    (src / "Annotations" / "TCGA-AA-0001.xml").write_text(XML)
    out = monuseg.convert(src, tmp_path / "out", workers=1)
    assert "1 images, 3 instances read; 2 written (1 regions with under 3 valid vertices" in capsys.readouterr().out
    docs = all_docs(out)
    image = next(im for d in docs.values() for im in d["images"])
    assert {k: image[k] for k in ("stain", "modality", "magnification", "microns_per_pixel")} == {
        "stain": "H&E", "modality": "brightfield", "magnification": "40x", "microns_per_pixel": 0.2527}
    masks = [decode(a) for d in docs.values() for a in d["annotations"]]
    expected = np.zeros((2, H, W), bool)
    expected[0, 2:5, 3:7] = True
    expected[1, 4:8, 6:9] = True
    assert np.array_equal(np.stack(masks), expected)  # the shared pixel (4, 6) is in both instances
    assert docs["train"]["info"]["licence"] == "CC BY-NC-SA 4.0"
    assert validate(out) == []


def png(arr: np.ndarray) -> bytes:
    return cv2.imencode(".png", arr)[1].tobytes()


def png_layout_zip(path: Path, ids: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for image_id in ids:
            zf.writestr(f"MoNuSeg_train/{image_id}/images/{image_id}.png", png(rgb()[..., ::-1]))
            for i in range(3):
                m = np.zeros((H, W), np.uint8)
                m[i * 3: i * 3 + 2, 1:5] = 255
                zf.writestr(f"MoNuSeg_train/{image_id}/masks/mask_{i:04d}.png", png(m))
    return path


def test_png_masks_and_xml_with_images_from_another_zip(tmp_path, capsys):
    masks_zip = png_layout_zip(tmp_path / "masks.zip", ["TCGA-AA-0001", "TCGA-BB-0002"])
    out = monuseg.convert(masks_zip, tmp_path / "png", workers=1)
    assert "2 images, 6 instances read; 6 written" in capsys.readouterr().out
    xml_zip = tmp_path / "xml.zip"
    with zipfile.ZipFile(xml_zip, "w") as zf:
        zf.writestr("Annotations/TCGA-AA-0001.xml", XML)
        zf.writestr("Annotations/TCGA-CC-0003.xml", XML)  # its image is in neither zip
    with pytest.raises(ConversionError, match="--images"):  # the XML gives no image size
        monuseg.convert(xml_zip, tmp_path / "none", workers=1)
    out = monuseg.convert(xml_zip, tmp_path / "xml", images=masks_zip, workers=1)
    text = capsys.readouterr().out
    assert "2 images, 6 instances read; 2 written" in text
    assert "TCGA-CC-0003.xml: no image found" in text and "1 images and 3 instances not written" in text
    images = [im for d in all_docs(out).values() for im in d["images"]]
    assert [(im["file_name"], im["annotation"]) for im in images] == [("TCGA-AA-0001.png", "xml")]
    assert (out / "images" / "TCGA-AA-0001.png").read_bytes() == zipfile.ZipFile(masks_zip).read(
        "MoNuSeg_train/TCGA-AA-0001/images/TCGA-AA-0001.png")


def test_official_test_folder_goes_to_test(tmp_path):
    for folder, image_id in [("MoNuSegTrainingData", "TCGA-AA-0001"), ("MoNuSegTestData", "TCGA-TT-0001")]:
        (tmp_path / "src" / folder).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "src" / folder / f"{image_id}.tif", rgb())
        (tmp_path / "src" / folder / f"{image_id}.xml").write_text(XML)
    docs = all_docs(monuseg.convert(tmp_path / "src", tmp_path / "out", splits="100,0,0", workers=1))
    assert [im["source_id"] for im in docs["test"]["images"]] == ["TCGA-TT-0001"]
    assert [im["source_id"] for im in docs["train"]["images"]] == ["TCGA-AA-0001"]


def xml_vs_png_agreement() -> tuple[int, int, float, list[float]]:
    """(XML regions, PNG masks, mean best IoU per XML nucleus, per-image mean IoU) on the 13 images."""
    xz = zipfile.ZipFile(DATA / "MoNuSeg_train_annotations_xml.zip")
    mz = zipfile.ZipFile(DATA / "MoNuSeg_train_masks.zip")
    members = mz.namelist()
    n_xml = n_png = 0
    best_all, per_image = [], []
    for name in sorted(n for n in xz.namelist() if n.endswith(".xml")):
        image_id = Path(name).stem
        polygons, _ = monuseg.parse_regions(xz.read(name))
        xml_rles = [encode_mask(monuseg.rasterise(p, 1000, 1000)) for p in polygons if len(p) >= 3]
        png_rles = [encode_mask(cv2.imdecode(np.frombuffer(mz.read(m), np.uint8), cv2.IMREAD_GRAYSCALE))
                    for m in members if m.startswith(f"MoNuSeg_train/{image_id}/masks/") and m.endswith(".png")]
        n_xml, n_png = n_xml + len(polygons), n_png + len(png_rles)
        best = mask_utils.iou(xml_rles, png_rles, [0] * len(png_rles)).max(axis=1)
        best_all.extend(best.tolist())
        per_image.append(float(best.mean()))
    return n_xml, n_png, float(np.mean(best_all)), per_image


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "MoNuSeg_train_annotations_xml.zip").is_file()
                    or not (DATA / "MoNuSeg_train_masks.zip").is_file(), reason="../shared/data absent")
def test_real_xml_reproduces_published_masks():
    n_xml, n_png, mean_iou, per_image = xml_vs_png_agreement()
    print(f"XML regions {n_xml}, PNG masks {n_png}, mean IoU {mean_iou:.4f}, worst image {min(per_image):.4f}")
    assert len(per_image) == 13
    assert abs(n_xml - n_png) <= 0.01 * n_png
    assert mean_iou > 0.93 and min(per_image) > 0.85
