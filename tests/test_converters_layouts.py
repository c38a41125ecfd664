"""Converters on the folder layouts users actually have: unpacked at any depth, symlinked
sub-folders, the zip a download fetched, zips inside a folder, Cellpose/StarDist naming
variants, image zips without masks, and small folders of one's own (built on the fly)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellrcnn.data.converters import bbbc038, cho, folder, membrane
from cellrcnn.data.converters.common import ConversionError
from cellrcnn.data.converters.sourcefs import SourceTree
from cellrcnn.data.splits import assign_split, split_salt


def png(arr: np.ndarray) -> bytes:
    return cv2.imencode(".png", arr)[1].tobytes()


def splits_of(out: Path) -> dict[str, str]:
    """file_name -> split of a converted folder."""
    found = {}
    for split in ("train", "val", "test"):
        doc = json.loads((out / "annotations" / f"{split}.json").read_text())
        found.update({im["file_name"]: split for im in doc["images"]})
    return found


def outline_image() -> np.ndarray:
    """24×24 outline drawing: one closed square ring (255) around a 7×7 interior."""
    drawing = np.zeros((24, 24), np.uint8)
    cv2.rectangle(drawing, (4, 4), (12, 12), 255, 1)
    return drawing


def make_cho(root: Path, n: int) -> Path:
    for sub in ("images", "ground_truth"):
        (root / sub).mkdir(parents=True)
    for i in range(1, n + 1):
        cv2.imwrite(str(root / "images" / f"cho{i:02d}.png"), np.full((24, 24), 10 * i, np.uint8))
        cv2.imwrite(str(root / "ground_truth" / f"cho{i:02d}.png"), outline_image())
    return root


def test_outline_split_does_not_depend_on_unpack_depth(tmp_path):
    shallow = cho.convert(make_cho(tmp_path / "a", 20), tmp_path / "out_a", workers=1)
    make_cho(tmp_path / "b" / "downloads" / "BBBC030" / "v1", 20)
    deep = cho.convert(tmp_path / "b", tmp_path / "out_b", workers=1)  # --src given three folders higher
    assert splits_of(shallow) == splits_of(deep)
    assert splits_of(shallow) == {f"cho{i:02d}.png": assign_split(f"cho{i:02d}.png", salt=split_salt("cho"))
                                  for i in range(1, 21)}  # hashed on the file's own name


def unet_master_zip(path: Path, n: int = 4) -> Path:
    """The repository zip that `download membrane` fetches: train/image, train/label, train/aug, test."""
    label = np.zeros((16, 16), np.uint8)
    label[2:6, 2:6] = 255
    label[9:14, 8:15] = 255
    base = "unet-master/data/membrane"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("unet-master/README.md", "unet")
        for i in range(n):
            zf.writestr(f"{base}/train/image/{i}.png", png(np.full((16, 16), 30 + i, np.uint8)))
            zf.writestr(f"{base}/train/label/{i}.png", png(label))
            zf.writestr(f"{base}/train/aug/image_{i}_1.png", png(label))  # augmentation output, not data
            zf.writestr(f"{base}/test/{i}.png", png(label))
            zf.writestr(f"{base}/test/{i}_predict.png", png(label))
    return path


def test_membrane_reads_the_downloaded_zip(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    archive = unet_master_zip(tmp_path / "raw" / "unet-master.zip")
    out = membrane.convert(archive, tmp_path / "out", workers=1)
    assert "4 images, 8 instances read; 8 written" in capsys.readouterr().out
    assert sorted(splits_of(out)) == ["0.png", "1.png", "2.png", "3.png"]
    membrane.convert(tmp_path / "raw", tmp_path / "out2", workers=1)  # the folder `download` wrote into
    assert "4 images, 8 instances read; 8 written" in capsys.readouterr().out


def test_source_tree_follows_symlinked_folders(tmp_path):
    (tmp_path / "store" / "images").mkdir(parents=True)
    (tmp_path / "store" / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "src").mkdir()
    try:
        os.symlink(tmp_path / "store", tmp_path / "src" / "linked", target_is_directory=True)
        os.symlink(tmp_path / "src", tmp_path / "store" / "loop", target_is_directory=True)  # a cycle
    except OSError:
        pytest.skip("symlinks not permitted here")
    files = SourceTree(tmp_path / "src").files
    assert "linked/images/a.png" in files and files["linked/images/a.png"][1].endswith("a.png")
    assert len(files) == 1  # the cycle back to src is not walked again


def labels_image() -> np.ndarray:
    lab = np.zeros((12, 14), np.uint16)
    lab[1:4, 1:4] = 1
    lab[6:10, 5:12] = 2
    return lab


def write_pair(image: Path, labels: Path) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    labels.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(image, np.ones((12, 14), np.uint16))
    tifffile.imwrite(labels, labels_image())


@pytest.mark.parametrize("layout", ["cp_masks", "masks_subfolder", "masks_subfolder_same_name", "stardist_images"])
def test_folder_finds_label_naming_variants(tmp_path, capsys, layout):
    src = tmp_path / "mine"
    for i in range(3):
        name = f"img{i}"
        labels = {"cp_masks": src / f"{name}_cp_masks.tif",  # what `cellpose --save_tif` writes
                  "masks_subfolder": src / "masks" / f"{name}_masks.tif",
                  "masks_subfolder_same_name": src / "masks" / f"{name}.tif",
                  "stardist_images": src / "masks" / f"{name}.tif"}[layout]
        image = src / "images" / f"{name}.tif" if layout == "stardist_images" else src / f"{name}.tif"
        write_pair(image, labels)
    given = src / "images" if layout == "stardist_images" else src  # the images/ folder itself given
    folder.convert(given, tmp_path / "out", workers=1)
    assert "3 images, 6 instances read; 6 written" in capsys.readouterr().out


def test_small_folder_gets_a_validation_image(tmp_path, capsys):
    src = tmp_path / "five"
    names = [f"field{i}" for i in range(5)]
    for name in names:
        write_pair(src / f"{name}.tif", src / f"{name}_masks.tif")
    by_hash = {f"{n}.tif": assign_split(f"{n}.tif", salt=split_salt("folder")) for n in names}
    out = folder.convert(src, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    got = splits_of(out)
    assert list(got.values()).count("val") >= 1
    if "val" not in by_hash.values():  # the hash alone left val empty: one train image moved, and said so
        assert "moved" in text and "from train to val" in text
        assert sum(got[k] != v for k, v in by_hash.items()) == 1
    assert all(got[k] == "test" for k, v in by_hash.items() if v == "test")  # test never changes
    if "test" not in got.values():
        assert "no image fell in test" in text


def test_small_folder_where_hash_leaves_val_empty(tmp_path, capsys):
    """Pick names whose hash puts none in val, so the guarantee is exercised for certain."""
    names = [f"s{i}" for i in range(200) if assign_split(f"s{i}.tif", salt=split_salt("folder")) == "train"][:4]
    src = tmp_path / "four"
    for name in names:
        write_pair(src / f"{name}.tif", src / f"{name}_masks.tif")
    got = splits_of(folder.convert(src, tmp_path / "out", workers=1))
    text = capsys.readouterr().out
    assert sorted(got.values()) == ["train", "train", "train", "val"]
    assert "from train to val" in text and "no image fell in test" in text


def dsb_zip(path: Path, ids: list[str], with_masks: bool) -> Path:
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:8] = 255
    with zipfile.ZipFile(path, "w") as zf:
        for image_id in ids:
            zf.writestr(f"{image_id}/images/{image_id}.png", png(np.full((10, 12, 3), 40, np.uint8)))
            if with_masks:
                zf.writestr(f"{image_id}/masks/m1.png", png(mask))
    return path


def test_bbbc038_image_zip_without_masks_is_an_error(tmp_path):
    archive = dsb_zip(tmp_path / "stage1_test.zip", ["aaa", "bbb"], with_masks=False)
    with pytest.raises(ConversionError, match="no masks/ folders.*--labels"):
        bbbc038.convert(archive, tmp_path / "out", workers=1)


def test_bbbc038_searches_a_folder_holding_the_zip(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    dsb_zip(tmp_path / "raw" / "stage1_train.zip", ["aaa", "bbb", "ccc"], with_masks=True)
    out = bbbc038.convert(tmp_path / "raw", tmp_path / "out", workers=1)
    assert "3 images, 3 instances read; 3 written" in capsys.readouterr().out
    assert sorted(splits_of(out)) == ["aaa.png", "bbb.png", "ccc.png"]


def test_images_without_annotations_warn(tmp_path, capsys):
    src = tmp_path / "empty_labels"
    src.mkdir()
    for i in range(3):
        tifffile.imwrite(src / f"e{i}.tif", np.ones((8, 8), np.uint8))
        tifffile.imwrite(src / f"e{i}_masks.tif", np.zeros((8, 8), np.uint16))
    out = folder.convert(src, tmp_path / "out", workers=1)
    captured = capsys.readouterr()
    assert "WARNING: none of the 3 images written has an annotation" in captured.err
    assert json.loads((out / "conversion.json").read_text())["images_without_annotations"] == [
        "e0.tif", "e1.tif", "e2.tif"]


def test_small_outline_folder_gets_a_validation_image(tmp_path, capsys):
    names = [f"f{i}" for i in range(300) if assign_split(f"f{i}.png", salt=split_salt("cho")) == "train"][:3]
    src = tmp_path / "mine"
    for sub in ("images", "outlines"):
        (src / sub).mkdir(parents=True)
    for name in names:
        cv2.imwrite(str(src / "images" / f"{name}.png"), np.full((24, 24), 50, np.uint8))
        cv2.imwrite(str(src / "outlines" / f"{name}.png"), outline_image())
    got = splits_of(cho.convert(src, tmp_path / "out", workers=1))
    assert sorted(got.values()) == ["train", "train", "val"] and "from train to val" in capsys.readouterr().out
