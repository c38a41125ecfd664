"""The convert command line: list, a conversion, validate, merge, stats, download (local files only)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellrcnn.data.convert import main
from cellrcnn.data.converters import SOURCES, download
from cellrcnn.data.converters.common import encode_mask, hash_split
from cellrcnn.data.converters.tools import stats


def membrane_src(root: Path, n: int = 4, corrupt: int | None = None) -> Path:
    for sub in ("image", "label"):
        (root / sub).mkdir(parents=True)
    label = np.zeros((32, 32), np.uint8)
    label[2:10, 2:10] = 255  # 8×8
    label[20:24, 20:30] = 255  # 4×10
    for i in range(n):
        img = root / "image" / f"{i}.png"
        if i == corrupt:
            img.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            cv2.imwrite(str(img), np.full((32, 32), 50 + i, np.uint8))
        cv2.imwrite(str(root / "label" / f"{i}.png"), label)
    return root


def test_list_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "cellrcnn.data.convert", "list"], capture_output=True, text=True,
                            check=True)
    for name in SOURCES:
        assert name in result.stdout
    assert "CC0" in result.stdout


def test_convert_validate_and_broken_files(tmp_path, capsys):
    src = membrane_src(tmp_path / "m", corrupt=2)
    out = tmp_path / "out"
    assert main(["membrane", "--src", str(src), "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "4 images, 6 instances read; 6 written" in text and "image/2.png: cannot decode" in text
    assert main(["validate", str(out)]) == 0
    assert main(["membrane", "--src", str(src), "--out", str(tmp_path / "s"), "--strict", "--workers", "1"]) == 1
    assert "2.png" in capsys.readouterr().err
    # damage the output: a wrong RLE size, a box that disagrees with its mask, an unreadable image
    path = next(p for p in (out / "annotations").glob("*.json") if json.loads(p.read_text())["annotations"])
    doc = json.loads(path.read_text())
    doc["annotations"][0]["segmentation"]["size"] = [31, 32]
    doc["annotations"][1]["bbox"][2] += 1
    path.write_text(json.dumps(doc))
    (out / "images" / doc["images"][0]["file_name"]).write_bytes(b"junk")
    capsys.readouterr()
    assert main(["validate", str(out)]) == 1
    text = capsys.readouterr().out
    ann0, ann1 = doc["annotations"][0]["id"], doc["annotations"][1]["id"]
    assert f"annotation {ann0} ({doc['images'][0]['file_name']}): RLE size [31, 32]" in text
    assert f"annotation {ann1}" in text and "but the mask's box is" in text
    assert f"{doc['images'][0]['file_name']}: cannot read image" in text


def test_merge_and_stats(tmp_path, capsys):
    a = tmp_path / "a"
    b = tmp_path / "b"
    main(["membrane", "--src", str(membrane_src(tmp_path / "ma", 3)), "--out", str(a), "--workers", "1"])
    main(["folder", "--src", str(_cellpose(tmp_path / "cp")), "--out", str(b), "--name", "cp", "--workers", "1"])
    assert main(["merge", str(tmp_path / "merged"), str(a), str(b)]) == 0
    assert main(["validate", str(tmp_path / "merged")]) == 0
    docs = [json.loads((tmp_path / "merged" / "annotations" / f"{s}.json").read_text()) for s in ("train", "val", "test")]
    images = [i for d in docs for i in d["images"]]
    anns = [x for d in docs for x in d["annotations"]]
    assert sorted(i["id"] for i in images) == list(range(1, 5)) and sorted(x["id"] for x in anns) == list(range(1, 8))
    assert sorted(i["source"] for i in images) == ["cp", "membrane", "membrane", "membrane"]
    assert all((tmp_path / "merged" / "images" / i["file_name"]).is_file() for i in images)
    s = stats(tmp_path / "merged")
    assert (s["images"], s["instances"], s["max_objects_per_image"]) == (4, 7, 2)
    assert s["object_size_px"]["max"] == 8.0 and s["suggested"]["detections_per_img"] == 100
    assert s["suggested"]["anchor_sizes"] == [4, 8, 16, 32, 64]
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "merged"), "--json", str(tmp_path / "s.json")]) == 0
    assert "4 images, 7 instances" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["instances"] == 7


def _cellpose(root: Path) -> Path:
    root.mkdir()
    cv2.imwrite(str(root / "x.png"), np.full((20, 20), 9, np.uint8))
    lab = np.zeros((20, 20), np.uint16)
    lab[3:6, 3:6] = 5
    cv2.imwrite(str(root / "x_masks.png"), lab)
    return root


def test_download_verifies_checksums_on_local_files(tmp_path, monkeypatch, capsys):
    payload = b"archive bytes" * 1000
    (tmp_path / "remote.zip").write_bytes(payload)
    url = (tmp_path / "remote.zip").as_uri()
    good = download.RemoteFile(url, "images.zip", sha256=hashlib.sha256(payload).hexdigest(),
                               md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(download.FILES, "bbbc039", [good])
    assert main(["download", "bbbc039", "--out", str(tmp_path / "dl")]) == 0
    assert (tmp_path / "dl" / "images.zip").read_bytes() == payload
    assert main(["download", "bbbc039", "--out", str(tmp_path / "dl")]) == 0
    assert "present, checksum OK" in capsys.readouterr().out
    bad = download.RemoteFile(url, "masks.zip", sha256="0" * 64)
    with pytest.raises(download.DownloadError, match="masks.zip: SHA-256"):
        download.download("bbbc039", tmp_path / "dl", files=[bad])
    assert not (tmp_path / "dl" / "masks.zip").exists() and not (tmp_path / "dl" / "masks.zip.part").exists()
    unknown = download.RemoteFile(url, "meta.zip")
    download.download("x", tmp_path / "dl", files=[unknown])
    assert hashlib.sha256(payload).hexdigest() in (tmp_path / "dl" / "SHA256SUMS").read_text()
    assert main(["download", "sartorius", "--out", str(tmp_path / "k")]) == 1
    assert "kaggle" in capsys.readouterr().err.lower()


def test_encode_mask_matches_pycocotools_and_hash_split_is_stable():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = rng.integers(1, 30, 2)
        m = rng.random((h, w)) < rng.random()
        assert encode_mask(m)["counts"] == mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"]
    m = np.ones((5, 7), bool)
    assert encode_mask(m)["counts"] == mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"]
    assert hash_split("abc") == hash_split("abc") == "train"  # fixed by the SHA-256 of the key
    shares = [hash_split(str(i)) for i in range(2000)]
    assert abs(shares.count("train") / 2000 - 0.8) < 0.03
