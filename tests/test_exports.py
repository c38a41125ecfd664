"""Every export re-read by its own reader gives back the label image's objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import roifile
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils
from skimage.draw import disk, polygon2mask

from cellrcnn.inference.exports import (
    coco_results,
    object_polygons,
    to_geojson,
    write_coco_results,
    write_geojson,
    write_imagej_rois,
    write_label_tiff,
    write_overlay_png,
)
from cellrcnn.inference.measurements import measure


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """Hard cases plus random disks: 1 disk with a hole; 2 two parts; 3 two pixels touching
    diagonally; 4 frame around 5 (an object inside another's hole); 6 at the image corner;
    7 a single pixel; 8.. disks."""
    lab = np.zeros((300, 400), np.int32)
    lab[disk((60, 60), 25)] = 1
    lab[disk((60, 60), 9)] = 0
    lab[100:110, 130:135] = 2
    lab[120:125, 130:160] = 2
    lab[200, 200] = lab[201, 201] = 3
    lab[240:290, 290:390] = 4
    lab[250:280, 300:380] = 0
    lab[255:275, 310:330] = 5
    lab[0:10, 390:400] = 6
    lab[150, 20] = 7
    rng = np.random.default_rng(0)
    k = 8
    for _ in range(200):
        c, r = rng.uniform(20, 280, 2), rng.uniform(3, 12)
        rr, cc = disk(c, r, shape=lab.shape)
        if not lab[rr, cc].any() and not lab[max(0, int(c[0] - r - 2)): int(c[0] + r + 3),
                                             max(0, int(c[1] - r - 2)): int(c[1] + r + 3)].any():
            lab[rr, cc] = k
            k += 1
    return lab


def rasterise(rings: list[np.ndarray], shape) -> np.ndarray:
    """Fill pixel-corner rings (x, y) by pixel centres: outer ring minus holes."""
    out = np.zeros(shape, bool)
    for i, ring in enumerate(rings):
        filled = polygon2mask(shape, np.asarray(ring, float)[:, ::-1] - 0.5)  # centre of pixel r is r + 0.5
        out = out & ~filled if i else out | filled
    return out


def test_label_tiff_round_trip(tmp_path, labels):
    path = write_label_tiff(tmp_path / "labels.tif", labels)
    back = tifffile.imread(path)
    assert back.dtype == np.uint16 and np.array_equal(back, labels)


def test_coco_results_decode_to_the_objects(tmp_path, labels):
    n = int(labels.max())
    scores = np.linspace(0.5, 1.0, n)
    path = write_coco_results(tmp_path / "results.json", coco_results(labels, image_id=7, scores=scores))
    results = json.loads(path.read_text())
    assert len(results) == n
    for k, res in enumerate(results, start=1):
        seg = res["segmentation"]
        mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        assert np.array_equal(mask, labels == k), k
        assert res["score"] == pytest.approx(scores[k - 1]) and res["image_id"] == 7 and res["category_id"] == 1
        assert res["area"] == mask.sum()
        assert res["bbox"] == pytest.approx(mask_utils.toBbox({"size": seg["size"], "counts": seg["counts"].encode()}))


def test_polygons_follow_pixel_edges_exactly(labels):
    seen = 0
    for k, parts in object_polygons(labels):
        mask = np.zeros(labels.shape, bool)
        for part in parts:
            mask |= rasterise(part, labels.shape)
            steps = [np.diff(np.vstack([r, r[:1]]), axis=0) for r in part]
            assert all(((s == 0).sum(axis=1) == 1).all() for s in steps)  # axis-aligned, no repeats
        assert np.array_equal(mask, labels == k), k
        seen += 1
    assert seen == labels.max()
    parts = dict(object_polygons(labels))
    assert len(parts[1]) == 1 and len(parts[1][0]) == 2  # disk with one hole
    assert len(parts[2]) == 2 and len(parts[3]) == 2  # two parts; diagonal pixels are two parts
    assert len(parts[7][0][0]) == 4  # a single pixel is its 4 corners
    assert sorted(map(tuple, parts[7][0][0])) == [(20, 150), (20, 151), (21, 150), (21, 151)]


def test_geojson_for_qupath(tmp_path, labels):
    table = measure(labels, image_name="x")
    path = write_geojson(tmp_path / "cells.geojson", labels, measurements=table, object_type="detection",
                         classification="Nucleus")
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == labels.max()
    types = {}
    for feature in data["features"]:
        props = feature["properties"]
        k = int(props["name"])
        assert props["objectType"] == "detection" and props["classification"]["name"] == "Nucleus"
        assert props["measurements"]["area_px"] == (labels == k).sum()
        geometry = feature["geometry"]
        types[k] = geometry["type"]
        polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        mask = np.zeros(labels.shape, bool)
        for poly in polys:
            assert all(ring[0] == ring[-1] for ring in poly)  # closed rings
            mask |= rasterise([np.array(r[:-1]) for r in poly], labels.shape)
        assert np.array_equal(mask, labels == k), k
    assert types[1] == "Polygon" and types[2] == "MultiPolygon"
    annotation = to_geojson(labels, object_type="annotation", classification=None, scores={1: 0.25})
    assert annotation["features"][0]["properties"]["measurements"] == {"score": 0.25}
    assert "classification" not in annotation["features"][0]["properties"]
    with pytest.raises(ValueError, match="object_type"):
        to_geojson(labels, object_type="cells")


def test_imagej_roi_zip(tmp_path, labels):
    path = write_imagej_rois(tmp_path / "rois.zip", labels)
    rois = roifile.roiread(path)
    assert len(rois) == labels.max()
    digits = len(str(labels.max()))  # zero-padded, so the ROI Manager sorts by label
    assert [r.name for r in rois] == [f"{k:0{digits}d}" for k in range(1, labels.max() + 1)]
    for k, roi in enumerate(rois, start=1):
        assert roi.roitype == roifile.ROI_TYPE.TRACED
        filled = rasterise([roi.coordinates()], labels.shape)
        if k >= 6:  # simple objects: the ROI is the object exactly
            assert np.array_equal(filled, labels == k), k
        else:  # holes and extra parts are not representable: the ROI covers the largest part
            assert (filled & (labels == k)).sum() >= 0.5 * (labels == k).sum()
    # rewriting replaces, never appends
    write_imagej_rois(path, labels[:150])
    assert len(roifile.roiread(path)) == len(np.unique(labels[:150])) - 1


def test_overlay_png(tmp_path, labels):
    rng = np.random.default_rng(0)
    raw = (1000 + 2000 * (labels > 0) + rng.normal(0, 50, labels.shape)).astype(np.uint16)
    path = write_overlay_png(tmp_path / "overlay.png", raw, labels)
    rgb = np.asarray(Image.open(path))
    assert rgb.shape == (*labels.shape, 3) and rgb.dtype == np.uint8
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    top = np.flatnonzero(labels[:, 60] == 1)[0]
    assert not grey[top, 60] and grey[top - 1, 60]  # the disk's top outline pixel is coloured
    assert grey[60, 60] and grey[60, 80]  # hole and interior keep the image (alpha 0)
    assert rgb[60, 80, 0] > rgb[60, 60, 0]  # bright object over dark background


def test_write_exports_and_full_coco_dataset(tmp_path, labels):
    from cellrcnn.data.coco import CocoInstanceDataset
    from cellrcnn.inference.exports import write_exports

    raw = (labels > 0).astype(np.uint8) * 200
    written = write_exports(tmp_path / "images", "field", labels, image_raw=raw,
                            formats=("tiff", "geojson", "imagej", "overlay"))
    assert sorted(p.name for p in written.values()) == ["field.geojson", "field.tif", "field_overlay.png",
                                                        "field_rois.zip"]
    with pytest.raises(ValueError, match="unknown export"):
        write_exports(tmp_path, "x", labels, formats=("png",))
    with pytest.raises(ValueError, match="image_raw"):
        write_exports(tmp_path, "x", labels, formats=("overlay",))
    # a complete COCO dataset opens in the project's own reader, object for object
    Image.fromarray(raw).save(tmp_path / "images" / "field.png")
    images = [{"id": 3, "file_name": "field.png", "height": labels.shape[0], "width": labels.shape[1]}]
    path = write_coco_results(tmp_path / "annotations" / "pred.json", coco_results(labels, 3), images=images)
    _, target = CocoInstanceDataset(path, image_root=tmp_path / "images", channels=1)[0]
    masks = target["masks"].numpy()
    assert len(masks) == labels.max()
    assert all(np.array_equal(masks[k - 1] > 0, labels == k) for k in range(1, labels.max() + 1))


def test_overlay_outlines_are_bright_and_thick_on_large_stained_images():
    from cellrcnn.viz import overlay_labels

    labels = np.zeros((1200, 1200), np.int32)
    for k in range(1, 41):  # 40 squares, so many colours are drawn
        y, x = divmod(k - 1, 8)
        labels[20 + 140 * y : 120 + 140 * y, 20 + 140 * x : 120 + 140 * x] = k
    he = np.zeros((1200, 1200, 3), np.float32)
    he[...] = (0.85, 0.55, 0.8)  # pink-purple H&E background
    rgb = overlay_labels(he, labels, alpha=0.0)
    top = rgb[20:22, 70]  # the first square's top edge: two pixels thick at this size
    assert np.all(top.max(axis=-1) == 255) and rgb[22, 70].tolist() == [217, 140, 204]
    edge = rgb[labels > 0][(rgb[labels > 0] != (217, 140, 204)).any(axis=-1)].astype(int)
    assert edge.max(axis=-1).min() == 255  # every outline colour at full value
    assert (edge[:, 1] >= edge[:, 2]).mean() > 0.5 and edge[:, 1].min() >= 170  # green-yellow-cyan, no magenta


def test_anomaly_flags_reach_geojson_and_roi_exports(tmp_path):
    import pandas as pd

    from cellrcnn.inference.exports import to_geojson, write_imagej_rois

    labels = np.zeros((40, 40), np.uint16)
    labels[2:10, 2:10], labels[20:30, 5:12], labels[25:35, 25:35] = 1, 2, 3
    table = pd.DataFrame({"label": [1, 2, 3], "area_px": [64.0, 70.0, 100.0], "anomaly_score": [0.1, 2.5, 0.2],
                          "is_anomalous": [False, True, False]})
    features = {f["properties"]["name"]: f["properties"] for f in to_geojson(labels, measurements=table)["features"]}
    assert [features[k]["classification"]["name"] for k in "123"] == ["Nucleus", "Nucleus: anomalous", "Nucleus"]
    assert features["2"]["classification"]["color"] == [255, 0, 0]
    assert features["2"]["measurements"]["is_anomalous"] == 1.0 and features["2"]["measurements"]["anomaly_score"] == 2.5
    rois = roifile.roiread(write_imagej_rois(tmp_path / "r.zip", labels, measurements=table))
    assert [r.name for r in rois] == ["1", "2-anomalous", "3"]
    assert rois[1].stroke_color == bytes((255, 255, 0, 0)) and rois[0].stroke_color != rois[1].stroke_color
