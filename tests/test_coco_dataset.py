"""CocoInstanceDataset on files written here: every annotation kind, image type and error."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cellrcnn.data.coco import CocoFormatError, CocoInstanceDataset
from cellrcnn.data.masks import encode_rle
from cellrcnn.io import ImageReadError

H, W = 24, 32


def _disk(cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _uncompressed(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE: alternating run lengths, column-major, starting with zeros."""
    counts, current, run = [], 0, 0
    for value in mask.ravel(order="F"):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture()
def root(tmp_path):
    """A COCO dataset: 4 images (8-bit PNG, 16-bit TIFF, RGBA PNG, RGB JPEG) with every annotation kind."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 200, (H, W), dtype=np.uint8)).save(images / "grey8.png")
    tifffile.imwrite(images / "grey16.tif", rng.integers(0, 4096, (H, W), dtype=np.uint16))
    Image.fromarray(rng.integers(0, 256, (H, W, 4), dtype=np.uint8), "RGBA").save(images / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images / "rgb.jpg")
    disk_a, disk_b, disk_c = _disk(6, 6, 4), _disk(15, 20, 5), _disk(18, 5, 3)
    anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "segmentation": encode_rle(disk_a), "bbox": [0, 0, 1, 1]},
        {"id": 2, "image_id": 10, "category_id": 1, "segmentation": [[20, 2, 28, 2, 28, 8, 20, 8]]},
        {"id": 3, "image_id": 10, "category_id": 1, "segmentation": _uncompressed(disk_b)},
        {"id": 4, "image_id": 10, "category_id": 1, "bbox": [1.5, 12, 6, 8]},  # box-only, no key
        {
            "id": 5,
            "image_id": 10,
            "category_id": 1,
            "segmentation": [],
            "bbox": [28, 20, 10, 10],
        },  # box-only, clipped
        {"id": 6, "image_id": 10, "category_id": 1, "segmentation": encode_rle(disk_c), "iscrowd": 1},
        {"id": 7, "image_id": 10, "category_id": 1, "segmentation": encode_rle(np.zeros((H, W), np.uint8))},
        {"id": 8, "image_id": 30, "category_id": 5, "segmentation": encode_rle(disk_c)},
    ]
    coco = {
        "info": {"source": "test", "licence": "CC0-1.0"},
        "images": [
            {"id": 30, "file_name": "rgba.png", "height": H, "width": W},
            {"id": 10, "file_name": "grey8.png", "height": H, "width": W},
            {"id": 20, "file_name": "grey16.tif", "height": H, "width": W},
            {"id": 40, "file_name": "rgb.jpg", "height": H, "width": W},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "nucleus"}, {"id": 5, "name": "mitotic"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(coco))
    return tmp_path, {"a": disk_a, "b": disk_b, "c": disk_c}


def _load(root, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoInstanceDataset(root / "annotations" / "train.json", **kw)
        items = [ds[i] for i in range(len(ds))]
    return ds, items, [str(w.message) for w in caught]


def test_every_annotation_kind(root):
    root, disks = root
    ds, items, messages = _load(root)
    assert [ds.image_info(i)["id"] for i in range(len(ds))] == [10, 20, 30, 40]  # sorted by id
    image, target = items[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert target["image_id"] == 10
    # RLE, polygon, uncompressed RLE, two box-only; crowd skipped; empty mask dropped
    assert target["has_mask"].tolist() == [True, True, True, False, False]
    masks = target["masks"].numpy()
    assert masks.dtype == np.uint8 and masks.shape == (5, H, W)
    assert np.array_equal(masks[0], disks["a"]) and np.array_equal(masks[2], disks["b"])
    assert masks[1].sum() == 48 and masks[3:].sum() == 0
    boxes = target["boxes"].numpy()
    assert boxes.dtype == np.float32
    assert boxes[0].tolist() == [2, 2, 11, 11]  # from the mask, not the wrong stored bbox
    assert boxes[1].tolist() == [20, 2, 28, 8]
    assert boxes[2].tolist() == [15, 10, 26, 21]
    assert boxes[3].tolist() == [1.5, 12, 7.5, 20]
    assert boxes[4].tolist() == [28, 20, 32, 24]  # clipped to the image
    assert target["labels"].tolist() == [1, 1, 1, 1, 1]
    assert any("iscrowd" in m for m in messages) and any(
        "annotation 7" in m and "empty" in m for m in messages
    )


def test_image_without_annotations_gives_empty_target(root):
    root, _ = root
    _, items, _ = _load(root)
    image, target = items[1]  # 16-bit TIFF, no annotations
    assert image.shape == (3, H, W)
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, H, W)
    assert target["labels"].shape == (0,) and target["has_mask"].shape == (0,)


def test_image_types_normalised(root):
    root, disks = root
    ds, items, _ = _load(root, channels=1)
    for image, _ in items:
        assert image.shape == (1, H, W) and image.dtype == torch.float32
        lo, hi = np.percentile(image.numpy(), [1, 99.8])
        assert lo == pytest.approx(0, abs=1e-4) and hi == pytest.approx(1, abs=1e-4)
    target = items[2][1]  # RGBA image with category 5 -> label 2
    assert target["labels"].tolist() == [2] and ds.label_names == {1: "nucleus", 2: "mitotic"}
    assert np.array_equal(target["masks"][0].numpy(), disks["c"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_transforms_are_applied(root):
    root, _ = root

    def flip(image, target):
        return image[:, :, ::-1].copy(), {**target, "masks": target["masks"][:, :, ::-1].copy()}

    plain = CocoInstanceDataset(root / "annotations" / "train.json", channels=1)[0]
    flipped = CocoInstanceDataset(root / "annotations" / "train.json", channels=1, transforms=flip)[0]
    assert torch.equal(flipped[0], plain[0].flip(-1))
    assert torch.equal(flipped[1]["masks"], plain[1]["masks"].flip(-1))


def _write(root, coco) -> object:
    path = root / "annotations" / "bad.json"
    path.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return path


def test_malformed_files_name_the_file_and_problem(root):
    root, disks = root
    good = json.loads((root / "annotations" / "train.json").read_text())
    cases = [
        ("{not json", "not valid JSON"),
        ({"annotations": []}, "missing top-level key 'images'"),
        ({**good, "images": [{"id": 1, "file_name": "x.png"}]}, "lacks"),
        ({**good, "annotations": [{**good["annotations"][0], "image_id": 999}]}, "unknown image id 999"),
        (
            {**good, "annotations": [{"id": 3, "image_id": 10, "category_id": 1}]},
            "neither segmentation nor bbox",
        ),
        (
            {
                **good,
                "annotations": [{**good["annotations"][0], "segmentation": encode_rle(np.zeros((5, 5)))}],
            },
            "differs from image",
        ),
    ]
    for content, problem in cases:
        path = _write(root, content)
        with pytest.raises(CocoFormatError) as err:
            CocoInstanceDataset(path)
        assert "bad.json" in str(err.value) and problem in str(err.value), str(err.value)
    with pytest.raises(CocoFormatError, match="no such annotation file"):
        CocoInstanceDataset(root / "annotations" / "missing.json")


def test_image_size_mismatch_and_corrupt_image(root):
    root, _ = root
    good = json.loads((root / "annotations" / "train.json").read_text())
    good["images"][1]["height"] = H + 1
    good["annotations"] = []
    ds = CocoInstanceDataset(_write(root, good))
    with pytest.raises(CocoFormatError, match="grey8.png.*25×32"):
        ds[0]
    (root / "images" / "grey16.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match="grey16.tif"):
        ds[1]
    (root / "images" / "rgb.jpg").unlink()
    with pytest.raises(ImageReadError, match="rgb.jpg"):
        ds[3]


def test_a_window_loads_what_cropping_the_full_target_keeps(root):
    root, _ = root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's deliberate empty and crowd annotations
        ds = CocoInstanceDataset(root / "annotations" / "train.json", channels=1)
        full_image, full = ds.load_numpy(0)
        y0, x0, h, w = 4, 10, 16, 18
        image, part = ds.load_numpy(0, (y0, x0, h, w))
        few = ds.load_target(0, (y0, x0, h, w), min_area=10**6)
    assert np.array_equal(image, full_image[:, y0 : y0 + h, x0 : x0 + w])
    cropped = full["masks"][:, y0 : y0 + h, x0 : x0 + w]
    kept = [m for m, has in zip(cropped, full["has_mask"], strict=True) if has and m.any()]
    assert np.array_equal(part["masks"][part["has_mask"]], np.stack(kept))
    boxes = part["boxes"][~part["has_mask"]]  # box-only objects: shifted and clipped to the window
    assert np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h) and np.all(boxes >= 0)
    # a fragment under min_area pixels is what a random crop drops; a whole small object stays
    assert len(few["masks"]) < len(part["masks"])
