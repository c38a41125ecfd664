"""BBBC038 / DSB 2018 converter on a fixture in the official zip layout, and on the real sample."""

from __future__ import annotations

import json
import zipfile
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellrcnn.data.converters import bbbc038
from cellrcnn.data.converters.common import ConversionError
from cellrcnn.data.converters.validate import validate
from cellrcnn.data.masks import encode_rle_string

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ID_A, ID_B = "a" * 64, "b" * 64  # ImageIds are 64 hex characters


def png(arr: np.ndarray) -> bytes:
    return cv2.imencode(".png", arr)[1].tobytes()


def make_masks() -> dict[str, dict[str, np.ndarray]]:
    """Image A (40×56, non-square): a nucleus split in two parts, two masks overlapping by 2 px.
    Image B (30×30): one nucleus; plus nothing else."""
    a = {}
    split = np.zeros((40, 56), np.uint8)
    split[2:6, 3:8] = 255
    split[10:13, 3:6] = 255  # second part of the same nucleus (not 4-connected)
    a["1" * 64] = split
    left = np.zeros((40, 56), np.uint8)
    left[20:30, 10:22] = 255
    right = np.zeros((40, 56), np.uint8)
    right[22:28, 20:35] = 255  # overlaps `left` on columns 20-21
    a["2" * 64], a["3" * 64] = left, right
    b = np.zeros((30, 30), np.uint8)
    b[5:15, 8:20] = 255
    return {ID_A: a, ID_B: {"4" * 64: b}}


def make_zip(path: Path, masks=None, corrupt_image: bool = False) -> Path:
    """The stage1_train.zip layout: no top-level folder, directory entries, __MACOSX entries."""
    masks = masks or make_masks()
    rgba = {ID_A: np.full((40, 56, 4), 255, np.uint8), ID_B: np.full((30, 30, 4), 255, np.uint8)}
    rgba[ID_A][..., :3] = 40
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for image_id, objs in masks.items():
            z.writestr(f"{image_id}/", b"")
            z.writestr(f"{image_id}/images/", b"")
            data = b"not a png" if corrupt_image and image_id == ID_B else png(rgba[image_id])
            z.writestr(f"{image_id}/images/{image_id}.png", data)
            z.writestr(f"{image_id}/masks/", b"")
            for mask_id, m in objs.items():
                z.writestr(f"{image_id}/masks/{mask_id}.png", png(m))
            z.writestr(f"__MACOSX/{image_id}/masks/._{'9' * 64}.png", b"\x00\x05\x16\x07junk")
    return path


def read_instances(out: Path) -> dict[str, list[np.ndarray]]:
    """source_id -> decoded masks in annotation order, over all splits."""
    found = {}
    for split in ("train", "val", "test"):
        doc = json.loads((out / "annotations" / f"{split}.json").read_text())
        for img in doc["images"]:
            anns = [a for a in doc["annotations"] if a["image_id"] == img["id"]]
            found[img["source_id"]] = [mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"]
                                                          .encode()}) for a in anns]
    return found


def test_zip_layout_converts_pixel_exact(tmp_path, capsys):
    out = bbbc038.convert(make_zip(tmp_path / "stage1_train.zip"), tmp_path / "out", workers=1)
    assert "2 images, 4 instances read; 4 written" in capsys.readouterr().out
    got, want = read_instances(out), make_masks()
    assert set(got) == {ID_A, ID_B}
    for image_id, objs in want.items():
        ref = [objs[k] > 0 for k in sorted(objs)]  # masks sorted by MaskId
        assert len(got[image_id]) == len(ref)
        for g, r in zip(got[image_id], ref, strict=True):
            np.testing.assert_array_equal(g.astype(bool), r)
    a_masks = got[ID_A]
    assert int((a_masks[1] & a_masks[2]).sum()) == 12  # the 2-px overlap survives
    assert (out / "images" / f"{ID_A}.png").read_bytes() == png(np.dstack([np.full((40, 56, 3), 40, np.uint8),
                                                                          np.full((40, 56), 255, np.uint8)]))
    assert validate(out) == []
    info = json.loads((out / "annotations" / "train.json").read_text())["info"]
    assert info["source"] == "bbbc038" and info["licence"] == "CC0 1.0"


def test_folder_and_top_level_folder_give_identical_output(tmp_path):
    make_zip(tmp_path / "s.zip")
    with zipfile.ZipFile(tmp_path / "s.zip") as z:
        z.extractall(tmp_path / "extracted" / "stage1_train")
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(tmp_path / "s.zip") as z, zipfile.ZipFile(nested, "w") as w:
        for info in z.infolist():
            w.writestr("stage1_train/" + info.filename, z.read(info.filename))
    runs = [bbbc038.convert(src, tmp_path / f"o{i}", workers=1)
            for i, src in enumerate([tmp_path / "s.zip", tmp_path / "extracted" / "stage1_train", nested])]
    texts = [(r / "annotations" / "train.json").read_bytes() + (r / "annotations" / "test.json").read_bytes()
             for r in runs]
    assert texts[0] == texts[1] == texts[2]


def test_rerun_and_pool_are_byte_identical(tmp_path):
    src = make_zip(tmp_path / "s.zip")
    out = tmp_path / "out"
    bbbc038.convert(src, out, workers=1)
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "images" / "unrelated.png").write_bytes(b"not written by a conversion")
    bbbc038.convert(src, out, workers=2)
    second = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    # a file no conversion recorded is never removed (tests/hostile covers the clean-up of recorded ones)
    assert second.pop(Path("images/unrelated.png")) == b"not written by a conversion"
    assert first == second


def test_corrupt_image_is_reported_and_skipped(tmp_path, capsys):
    src = make_zip(tmp_path / "s.zip", corrupt_image=True)
    out = bbbc038.convert(src, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert "2 images, 4 instances read; 3 written" in text
    assert f"{ID_B}/images/{ID_B}.png" in text and "cannot decode" in text
    assert set(read_instances(out)) == {ID_A}
    with pytest.raises(ConversionError, match=f"{ID_B}.png"):
        bbbc038.convert(src, tmp_path / "strict", workers=1, strict=True)


def test_csv_column_major_rle_and_usage(tmp_path, capsys):
    masks = make_masks()
    rows = ["ImageId,EncodedPixels,Height,Width,Usage"]
    for image_id, objs in masks.items():
        h, w = next(iter(objs.values())).shape
        rows += [f"{image_id},{encode_rle_string(m > 0, order='F')},{h},{w},Private" for _, m in sorted(objs.items())]
    rows.append(f"{'c' * 64},1 5,10,10,Ignored")  # a stage-2 decoy: not converted
    rows.append(f"{ID_B},1 2 3,30,30,Private")  # odd number of values: reported by line
    (tmp_path / "stage2_solution_final.csv").write_text("\n".join(rows) + "\n")
    out = bbbc038.convert(tmp_path / "stage2_solution_final.csv", tmp_path / "out", images=False, workers=1)
    text = capsys.readouterr().out
    assert "2 images, 5 instances read; 4 written" in text
    assert "stage2_solution_final.csv:7" in text and "odd number" in text
    got = read_instances(out)
    for image_id, objs in masks.items():
        for g, (_, r) in zip(got[image_id], sorted(objs.items()), strict=True):
            np.testing.assert_array_equal(g.astype(bool), r > 0)
    test = json.loads((out / "annotations" / "test.json").read_text())
    assert len(test["images"]) == 2 and test["info"]["annotation_only"] is True  # solution = official test
    assert validate(out) == []


def test_labels_csv_with_images_from_zip(tmp_path):
    masks = make_masks()
    rows = ["ImageId,EncodedPixels"] + [f"{i},{encode_rle_string(m > 0, 'F')}" for i, o in masks.items()
                                        for _, m in sorted(o.items())]
    (tmp_path / "stage1_train_labels.csv").write_text("\n".join(rows) + "\n")
    src = make_zip(tmp_path / "s.zip")
    a = bbbc038.convert(src, tmp_path / "csv", labels=[tmp_path / "stage1_train_labels.csv"], workers=1)
    b = bbbc038.convert(src, tmp_path / "png", workers=1)
    for split in ("train", "val", "test"):
        ja = json.loads((a / "annotations" / f"{split}.json").read_text())
        jb = json.loads((b / "annotations" / f"{split}.json").read_text())
        assert ja["annotations"] == jb["annotations"]


_ZIP: dict[str, zipfile.ZipFile] = {}


def _check_image(args):
    """Worker: compare one image's masks (PNG decoded by cv2) with the decoded RLEs."""
    zip_path, names, segs = args
    if zip_path not in _ZIP:  # one handle per worker process
        _ZIP[zip_path] = zipfile.ZipFile(zip_path)
    z = _ZIP[zip_path]
    if len(names) != len(segs):
        return f"{names[:1]}: {len(names)} masks but {len(segs)} annotations"
    for name, seg in zip(names, segs, strict=True):
        ref = cv2.imdecode(np.frombuffer(z.read(name), np.uint8), cv2.IMREAD_UNCHANGED) > 0
        got = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        if not np.array_equal(ref, got):
            return f"{name} differs"
    return len(segs)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "bbbc038" / "stage1_train.zip").is_file(), reason="../shared/data absent")
def test_real_stage1_train_zip(tmp_path, capsys):
    """All 24,006 masks of the 621 images are compared pixel by pixel with the source PNGs."""
    src = DATA / "bbbc038" / "stage1_train.zip"
    out = bbbc038.convert(src, tmp_path / "bbbc038", workers=2)
    assert "621 images, 24,006 instances read; 24,006 written" in capsys.readouterr().out
    with zipfile.ZipFile(src) as z:
        masks: dict[str, list[str]] = {}
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[1] == "masks" and parts[2].endswith(".png"):
                masks.setdefault(parts[0], []).append(name)
    jobs = []
    for split in ("train", "val", "test"):
        doc = json.loads((out / "annotations" / f"{split}.json").read_text())
        by_image = {img["id"]: (img["source_id"], []) for img in doc["images"]}
        for ann in doc["annotations"]:
            by_image[ann["image_id"]][1].append(ann["segmentation"])
        jobs += [(str(src), sorted(masks.get(sid, [])), segs) for sid, segs in by_image.values()]
    assert len(jobs) == 621
    with Pool(2) as pool:
        results = pool.map(_check_image, jobs, chunksize=8)
    assert [r for r in results if isinstance(r, str)] == []
    assert sum(results) == 24006
    assert validate(out, check_images=False) == []


def test_masks_without_image_are_counted_and_reported(tmp_path, capsys):
    src = make_zip(tmp_path / "s.zip")
    with zipfile.ZipFile(src, "a") as z:
        z.writestr(f"{'e' * 64}/masks/{'5' * 64}.png", png(np.full((4, 4), 255, np.uint8)))
    bbbc038.convert(src, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert "3 images, 5 instances read; 4 written" in text and f"{'e' * 64}/images: missing image" in text
