"""S-BSST265 converter: uint16 label TIFFs, LZW raw images, grey-in-RGB images, the latin-1
``;``-separated description CSV with decimal commas, official train/test split."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellrcnn.data.converters import sbsst265
from cellrcnn.data.converters.validate import validate
from cellrcnn.data.splits import assign_split, split_salt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADER = ("Image_Name;Diagnosis;Preparation;Train-/Testset split;Testset class;Magnification;Modality;Device;"
          "Software;Mean BG signal;Mean FG signal;Signal/Noise;S/N Class")


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def labels(k: int) -> np.ndarray:
    """Image k: k+1 nuclei, ids sparse (10, 20, ...) and one disconnected id (kept as one)."""
    lab = np.zeros((16, 20), np.uint16)
    for i in range(k + 1):
        lab[1 + 3 * i: 3 + 3 * i, 1:4] = 10 * (i + 1)
    lab[14:16, 17:20] = 10  # second part of nucleus 10
    return lab


def make_zip(path: Path, rows: list[str], present: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dataset/image_description.csv", ("\n".join([HEADER, *rows]) + "\n").encode("latin-1"))
        for k, name in enumerate(present):
            grey = (np.arange(16 * 20, dtype=np.uint8).reshape(16, 20) + k)
            raw = np.dstack([grey] * 3) if k == 0 else grey  # the tissue images: one grey in RGB, LZW
            zf.writestr(f"dataset/rawimages/{name}.tif", tiff_bytes(raw, compression="lzw" if k == 0 else None))
            zf.writestr(f"dataset/groundtruth/{name}.tif", tiff_bytes(labels(k)))
    return path


def row(name: str, split: str = "train", cls: str = "-") -> str:
    return f"{name};Neuroblastoma;BM cytospin;{split};{cls};63x;FM;Zeiss Axioplan II;Metafer;13,1;99,4;7,6;>=4,<40"


def test_labels_metadata_and_absent_rows(tmp_path, capsys):
    names = ["Neuroblastoma_0", "Neuroblastoma_1", "normal_2"]
    src = make_zip(tmp_path / "S-BSST265.zip", [row(n) for n in names] + [row("absent_7")], names)
    out = sbsst265.convert(src, tmp_path / "out", workers=1)
    text = capsys.readouterr().out
    assert "3 images, 6 instances read; 6 written" in text  # 1 + 2 + 3 nuclei
    assert "1 image(s) listed in image_description.csv are absent" in text and "absent_7" in text
    docs = {s: json.loads((out / "annotations" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    images = {im["source_id"]: im for d in docs.values() for im in d["images"]}
    assert set(images) == set(names)
    first = images["Neuroblastoma_0"]
    assert first["file_name"] == "Neuroblastoma_0.png"  # grey-in-RGB written as one-channel PNG
    assert images["Neuroblastoma_1"]["file_name"] == "Neuroblastoma_1.tif"
    assert (first["mean_bg_signal"], first["mean_fg_signal"], first["signal_to_noise"]) == (13.1, 99.4, 7.6)
    assert first["magnification"] == "63x" and first["modality"] == "fluorescence"
    assert first["snr_class"] == ">=4,<40" and first["official_split"] == "train" and "testset_class" not in first
    # no official test image present: every train image is split by hash (val and test carved)
    for name, im in images.items():
        split = next(s for s, d in docs.items() if im in d["images"])
        assert split == assign_split(name, salt=split_salt("sbsst265"))
    areas = sorted(a["area"] for d in docs.values() for a in d["annotations"] if a["image_id"] == first["id"])
    assert areas == [12]  # nucleus 10 keeps both parts (6 + 6 px)
    assert docs["train"]["info"]["licence"] == "CC0 1.0"
    assert json.loads((out / "conversion.json").read_text())["instances_written"] == 6
    assert validate(out) == []


def test_official_test_images_go_to_test(tmp_path):
    names = ["a_0", "a_1", "t_0"]
    rows = [row("a_0"), row("a_1"), row("t_0", "test", "NB-II")]
    out = sbsst265.convert(make_zip(tmp_path / "s.zip", rows, names), tmp_path / "out", splits="50,50,0", workers=1)
    test = json.loads((out / "annotations" / "test.json").read_text())
    assert [im["source_id"] for im in test["images"]] == ["t_0"]
    assert test["images"][0]["testset_class"] == "NB-II"
    train_val = [json.loads((out / "annotations" / f"{s}.json").read_text()) for s in ("train", "val")]
    assert sorted(im["source_id"] for d in train_val for im in d["images"]) == ["a_0", "a_1"]


def test_snake_case_and_values():
    assert sbsst265.snake_case("Mean BG signal") == "mean_bg_signal"
    assert sbsst265.parse_value("Signal/Noise", "34,1") == 34.1
    assert sbsst265.parse_value("Testset class", "-") is None
    assert sbsst265.parse_value("S/N Class", ">=4,<40") == ">=4,<40"
    latin1 = "Image_Name;Device\na;Mikroskop µ\n".encode("latin-1")
    assert sbsst265.read_description(latin1) == {"a": {"device": "Mikroskop µ"}}
    resaved = b"\xef\xbb\xbf" + b"Image_Name;Signal/Noise\na;3,5\n"
    assert sbsst265.read_description(resaved) == {"a": {"signal_to_noise": 3.5}}


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "s_bsst265" / "S-BSST265_train.zip").is_file(), reason="../shared/data absent")
def test_real_train_split(tmp_path, capsys):
    out = sbsst265.convert(DATA / "s_bsst265" / "S-BSST265_train.zip", tmp_path / "out", workers=1)
    assert "42 images, 2,678 instances read; 2,678 written" in capsys.readouterr().out
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["splits"]["val"]["images"] >= 1 and summary["skipped"] == []
    train = json.loads((out / "annotations" / "train.json").read_text())
    assert all(im["official_split"] == "train" and im["modality"] == "fluorescence" for im in train["images"])
