"""Synthetic nuclei: deterministic bytes, valid COCO, overlapping masks kept, ensure_dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cellrcnn.data.coco import CocoInstanceDataset
from cellrcnn.data.synthetic import (
    MAX_OVERLAP,
    ensure_dataset,
    generate_dataset,
    is_complete,
    main,
    render_image,
    write_png,
)
from cellrcnn.io import read_image

SMALL = {"n_train": 3, "n_val": 2, "n_test": 1, "size": 96, "seed": 0}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("syn") / "a", **SMALL)


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    again = _files(generate_dataset(tmp_path / "b", **SMALL))
    first = _files(small)
    assert again == first and len(first) == 6 + 3 + 1  # images, split files, manifest
    other = _files(generate_dataset(tmp_path / "c", **{**SMALL, "seed": 1}))
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first if k.startswith("images/"))


def test_image_depends_only_on_seed_split_index(small, tmp_path):
    bigger = generate_dataset(tmp_path / "d", **{**SMALL, "n_train": 4})
    assert (bigger / "images" / "train_0002.png").read_bytes() == (
        small / "images" / "train_0002.png"
    ).read_bytes()
    assert (bigger / "images" / "val_0001.png").read_bytes() == (
        small / "images" / "val_0001.png"
    ).read_bytes()


def test_pycocotools_loads_and_counts_match(small):
    ids = set()
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        data = json.loads((small / "annotations" / f"{split}.json").read_text())
        assert data["info"]["source"] and data["info"]["licence"]
        coco = COCO(str(small / "annotations" / f"{split}.json"))
        assert len(coco.getImgIds()) == n
        assert len(coco.getAnnIds()) == len(data["annotations"]) > 0
        for ann in coco.loadAnns(coco.getAnnIds()):
            m = coco.annToMask(ann)
            assert m.shape == (96, 96) and m.sum() == ann["area"] > 0 and ann["iscrowd"] == 0
            assert mask_utils.toBbox(ann["segmentation"]).tolist() == ann["bbox"]
        ids |= set(coco.getImgIds())
        ds = CocoInstanceDataset(small / "annotations" / f"{split}.json")
        image, target = ds[0]
        assert image.shape == (3, 96, 96) and len(target["boxes"]) == len(
            coco.getAnnIds(imgIds=ds.image_info(0)["id"])
        )
    assert len(ids) == 6  # image ids unique across splits


def test_fields_mix_modalities_bit_depths_and_slight_overlaps():
    modalities, depths, overlaps = set(), set(), 0
    for i in range(24):
        image, masks, meta = render_image(np.random.default_rng([7, i]), 128)
        modalities.add(meta["modality"])
        depths.add(image.dtype)
        assert image.shape == (128, 128) and len(masks) > 0
        stack = np.stack(masks).astype(np.int32)
        area = stack.sum(axis=(1, 2))
        assert area.min() >= 20
        inter = np.einsum("ihw,jhw->ij", stack, stack)
        np.fill_diagonal(inter, 0)
        overlaps += int((inter > 0).sum())
        # every overlap is slight: at most MAX_OVERLAP of either object
        assert np.all(inter <= MAX_OVERLAP * area[:, None] + 1e-9)
        if meta["modality"] == "brightfield":  # dark objects on a bright background
            union = stack.max(axis=0) > 0
            assert image[union].mean() < image[~union].mean()
        else:
            union = stack.max(axis=0) > 0
            assert image[union].mean() > image[~union].mean()
    assert modalities == {"fluorescence", "brightfield"}
    assert depths == {np.dtype(np.uint8), np.dtype(np.uint16)}
    assert overlaps > 0  # overlapping objects keep their full, overlapping masks


def test_ensure_dataset_regenerates_only_when_needed(tmp_path):
    root = tmp_path / "syn"
    kw = {"n_train": 2, "n_val": 1, "n_test": 1, "size": 64, "seed": 3}
    assert not is_complete(root, **kw)
    ensure_dataset(root, **kw)
    assert is_complete(root, **kw)
    stamp = (root / "images" / "train_0000.png").stat().st_mtime_ns
    ensure_dataset(root, **kw)
    assert (root / "images" / "train_0000.png").stat().st_mtime_ns == stamp  # no-op
    assert not is_complete(root, **{**kw, "seed": 4})
    (root / "images" / "val_0000.png").unlink()
    assert not is_complete(root, **kw)
    ensure_dataset(root, **kw)
    assert is_complete(root, **kw) and (root / "images" / "val_0000.png").is_file()
    ensure_dataset(root, **{**kw, "n_train": 1})  # other parameters: regenerated, stale images gone
    assert not (root / "images" / "train_0001.png").exists()
    (root / "images" / "mine.png").write_bytes(b"not ours")
    ensure_dataset(root, **kw)  # regenerates, leaves other files alone
    assert (root / "images" / "mine.png").read_bytes() == b"not ours"
    with pytest.raises(TypeError, match="colour"):
        ensure_dataset(root, colour=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_bit_depth_round_trip(tmp_path, dtype):
    image = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (9, 11), dtype=dtype)
    write_png(tmp_path / "x.png", image)
    back = read_image(tmp_path / "x.png")
    assert back.dtype == dtype and np.array_equal(back, image)


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--n-train", "1", "--n-val", "1", "--n-test", "1", "--size", "64"])
    assert "3 images ready" in capsys.readouterr().out
    assert is_complete(tmp_path / "cli", n_train=1, n_val=1, n_test=1, size=64)
