"""Converters, merge and validate against careless and hostile folders: foreign files in --out,
path traversal in merged JSON, zip bombs and truncated zips, splits of two runs, empty JSON."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellrcnn.data.convert import main as convert_main
from cellrcnn.data.converters.sourcefs import SourceTree, read_ref
from cellrcnn.data.converters.tools import merge
from cellrcnn.data.converters.validate import validate

from .conftest import run_limited, tree_bytes


def make_source(root: Path, names=("a", "b", "c")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image = np.full((16, 18), 100 + i, np.uint16)
        labels = np.zeros((16, 18), np.uint16)
        labels[2:6, 3:8] = 1
        labels[9:13, 10:15] = 2
        tifffile.imwrite(root / f"{name}.tif", image)
        tifffile.imwrite(root / f"{name}_masks.tif", labels)
    return root


def convert(src: Path, out: Path, *extra: str) -> int:
    return convert_main(["folder", "--src", str(src), "--out", str(out), "--workers", "1", *extra])


def test_foreign_output_folder_is_refused_unless_forced_and_never_emptied(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "thesis_figure.png").write_bytes(b"irreplaceable")
    (out / "notes.txt").write_bytes(b"mine")
    before = tree_bytes(out)
    assert convert(src, out) == 1
    assert "--force" in capsys.readouterr().err
    assert tree_bytes(out) == before  # nothing written, nothing removed
    assert convert(src, out, "--force") == 0
    after = tree_bytes(out)
    assert {k: after[k] for k in before} == before  # the foreign files survive the conversion
    assert "images/a.tif" in after


def test_reconversion_removes_only_recorded_images_and_lists_them(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    out = tmp_path / "out"
    assert convert(src, out) == 0
    (out / "images" / "added_by_user.tif").write_bytes(b"keep")
    (src / "b.tif").unlink()
    (src / "b_masks.tif").unlink()
    capsys.readouterr()
    assert convert(src, out) == 0  # an earlier conversion: no --force needed
    text = capsys.readouterr().out
    assert "removed 1 image(s) of the earlier conversion" in text and "b.tif" in text
    assert not (out / "images" / "b.tif").exists()
    assert (out / "images" / "added_by_user.tif").read_bytes() == b"keep"
    assert json.loads((out / "conversion.json").read_text())["removed_stale_images"] == ["b.tif"]


def test_every_source_skipped_exits_nonzero(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.tif").write_bytes(b"not a tiff")
    tifffile.imwrite(src / "a_masks.tif", np.ones((4, 4), np.uint16))
    assert convert(src, tmp_path / "out") == 1


def _hostile_copy(good: Path, dest: Path, source=None, file_name=None) -> Path:
    shutil.copytree(good, dest)
    for split in ("train", "val", "test"):
        path = dest / "annotations" / f"{split}.json"
        doc = json.loads(path.read_text())
        if source is not None:
            doc["info"]["source"] = source
        if file_name is not None:
            for img in doc["images"]:
                img["file_name"] = file_name
        path.write_text(json.dumps(doc))
    return dest


@pytest.mark.parametrize("source,file_name", [("../../escaped", None), ("/tmp/abs", None),
                                              (None, "../../../escaped.tif"), (None, "/etc/escaped.tif"),
                                              (None, "sub/../../x.tif"), (None, "C:\\x.tif")])
def test_merge_and_validate_reject_names_leading_outside(tmp_path, source, file_name):
    good = tmp_path / "good"
    assert convert(make_source(tmp_path / "src"), good, "--splits", "1,1,1") == 0
    bad = _hostile_copy(good, tmp_path / "bad", source, file_name)
    sandbox = tmp_path / "sandbox"
    out = sandbox / "a" / "b" / "merged"
    before = tree_bytes(tmp_path)
    with pytest.raises(ValueError, match="not a plain relative path|single folder name"):
        merge(out, [good, bad])
    assert tree_bytes(tmp_path) == before and not out.exists()  # nothing written anywhere
    if file_name is not None:
        problems = validate(bad)
        assert any("is not a plain relative path" in p for p in problems), problems


def test_merge_cli_refuses_a_foreign_folder(tmp_path, capsys):
    good = tmp_path / "good"
    assert convert(make_source(tmp_path / "src"), good) == 0
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert convert_main(["merge", str(out), str(good)]) == 1
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"


def test_zip_member_above_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z, z.open("images/huge.tif", "w") as member:
        for _ in range(64):
            member.write(bytes(1 << 20))  # 64 MB of zeros, 64 kB compressed
    monkeypatch.setattr("cellrcnn.data.converters.sourcefs.MAX_MEMBER_BYTES", 8 << 20)
    tree = SourceTree(archive)
    with pytest.raises(OSError, match=r"bomb.zip:images/huge.tif: declares 67,108,864 bytes.*above the limit"):
        tree.read("images/huge.tif")


def test_zip_member_lying_about_its_size_stays_within_memory(tmp_path):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z, z.open("a.tif", "w") as member:
        for _ in range(256):
            member.write(bytes(1 << 20))  # 256 MB of zeros, 250 kB compressed
    # the central directory (what zipfile trusts) now declares 1000 bytes uncompressed
    data = bytearray(archive.read_bytes())
    entry = data.rfind(b"PK\x01\x02")
    data[entry + 24 : entry + 28] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    proc = run_limited(f"""
        from cellrcnn.data.converters.sourcefs import read_ref
        limit_memory(150)  # the whole member would need 256 MB
        try:
            read_ref(({str(archive)!r}, "a.tif"))
        except OSError as exc:
            print("REFUSED", exc)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "liar.zip:a.tif" in proc.stdout


def test_truncated_zip_says_so(tmp_path):
    archive = tmp_path / "stage1_train.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a/images/a.png", bytes(5000))
    archive.write_bytes(archive.read_bytes()[:3000])  # an interrupted download
    with pytest.raises(ValueError, match="stage1_train.zip: not a readable zip archive \\(truncated"):
        SourceTree(archive)
    assert read_ref(("", str(archive)))  # plain files below the limit still read


def test_validate_detects_splits_of_two_runs_and_unlisted_images(tmp_path):
    src = make_source(tmp_path / "src", names=("a", "b", "c", "d", "e", "f"))
    one, two = tmp_path / "one", tmp_path / "two"
    assert convert(src, one, "--splits", "1,1,1") == 0
    assert convert(src, two, "--splits", "2,1,0") == 0
    assert validate(one) == []
    # an interrupted re-conversion: train.json of the new run, val/test.json of the old one
    shutil.copy(two / "annotations" / "train.json", one / "annotations" / "train.json")
    (one / "images" / "orphan.tif").write_bytes((one / "images" / "a.tif").read_bytes())
    problems = validate(one)
    assert any("different conversion runs" in p for p in problems), problems
    assert any("orphan.tif" in p and "listed in no split" in p for p in problems), problems


def test_validate_names_an_empty_or_broken_json(tmp_path):
    good = tmp_path / "good"
    assert convert(make_source(tmp_path / "src"), good) == 0
    (good / "annotations" / "val.json").write_bytes(b"")
    (good / "annotations" / "test.json").write_bytes(b"[1, 2")
    problems = validate(good)
    assert any(p.endswith("val.json: empty file") for p in problems), problems
    assert any("test.json: invalid JSON" in p for p in problems), problems


def test_one_bad_height_skips_one_image_not_the_conversion(tmp_path, capsys):
    from cellrcnn.data.converters import bbbc038

    good, bad = "a" * 64, "b" * 64
    rows = ["ImageId,EncodedPixels,Height,Width,Usage", f"{good},1 5 20 5,10,10,Private",
            f"{bad},1 5,ten,10,Private"]
    (tmp_path / "solution.csv").write_text("\n".join(rows) + "\n")
    out = bbbc038.convert(tmp_path / "solution.csv", tmp_path / "out", images=False, workers=1)
    text = capsys.readouterr().out
    assert "bad Height/Width 'ten'/'10'" in text and f"{bad}: no valid Height/Width" in text
    assert "2 images, 2 instances read; 1 written" in text
    assert validate(out, check_images=False) == []


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates a file: code ran


def test_folder_converter_does_not_unpickle_seg_npy_without_consent(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", np.ones((8, 8), np.uint16))
    marker = tmp_path / "pwned"
    np.save(src / "a_seg.npy", np.array({"masks": _Exploit(str(marker))}, dtype=object), allow_pickle=True)
    assert convert(src, tmp_path / "out") == 1  # the only image was skipped
    assert "--allow-pickle" in capsys.readouterr().out
    assert not marker.exists()


def test_interrupted_reconversion_leaves_the_old_output_whole(tmp_path, monkeypatch):
    from cellrcnn.data.converters import common

    src = make_source(tmp_path / "src", names=("a", "b", "c", "d"))
    out = tmp_path / "out"
    assert convert(src, out, "--splits", "1,1,1") == 0
    before = tree_bytes(out)
    calls = {"n": 0}
    real = common.write_bytes

    def dies_midway(path, data):  # a kill after the first annotation file of the new run
        if path.suffix == ".json" and calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += path.suffix == ".json"
        real(path, data)

    monkeypatch.setattr(common, "write_bytes", dies_midway)
    monkeypatch.setattr(common, "write_together", lambda files: [dies_midway(p, d) for p, d in files.items()])
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, "--splits", "2,1,0")
    assert tree_bytes(out) == before and validate(out) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_converter_refuses_a_z_stack_instead_of_taking_page_0(tmp_path, capsys):
    src = make_source(tmp_path / "src", names=("a",))
    tifffile.imwrite(src / "z.tif", np.zeros((5, 16, 18), np.uint16))  # five pages
    tifffile.imwrite(src / "z_masks.tif", np.ones((16, 18), np.uint16))
    assert convert(src, tmp_path / "out") == 0
    text = capsys.readouterr().out
    assert "z.tif: a stack of 5 pages" in text and "1 images and 0 instances not written" in text
