"""predict never overwrites an input, writes atomically, replaces (never writes through) a symlink
in the output folder, and a run where every file was skipped fails."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellrcnn.config import compose_config
from cellrcnn.io import atomic_write, protect_inputs, read_label_image, write_label_image
from cellrcnn.predict import run as predict_run

from .conftest import tree_bytes


def _nuclei(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), 200.0)
    for _ in range(6):
        cy, cx = rng.integers(15, size - 15, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 3000
    return (image + rng.normal(0, 20, image.shape)).clip(0, 65535).astype(np.uint16)


def _predict(tmp_path, *overrides):
    cfg = compose_config("predict", [*overrides, "threads=1", "overlays=true"], tmp_path / "run")
    return predict_run(cfg)


def test_predict_into_its_own_input_folder_keeps_every_input(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", _nuclei(0))  # its label image would be a.tif too
    Image.fromarray((_nuclei(1) // 16).astype(np.uint8)).save(folder / "b.png")
    Image.fromarray((_nuclei(2) // 16).astype(np.uint8)).save(folder / "b_overlay.png")  # b's overlay name
    before = tree_bytes(folder)

    summary = _predict(tmp_path, f"input={folder}", f"output={folder}")

    after = tree_bytes(folder)
    assert {k: after[k] for k in before} == before  # inputs byte-identical
    labels = {row["file"].rsplit("/", 1)[-1]: row["labels"] for row in summary["images"]}
    assert labels["a.tif"] == "a_pred.tif" and labels["b.png"] == "b_pred.tif"
    assert read_label_image(folder / "a_pred.tif").shape == (96, 96)
    assert (folder / "a_pred_overlay.png").is_file()
    assert not [p for p in folder.iterdir() if ".part" in p.name]  # no temporary file left


def test_symlink_in_output_folder_is_replaced_not_written_through(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "c.tif", _nuclei(3))
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "c.tif")
    os.symlink(victim, out / "c_overlay.png")

    _predict(tmp_path, f"input={src}", f"output={out}")

    assert victim.read_bytes() == b"keep me"
    assert not (out / "c.tif").is_symlink() and read_label_image(out / "c.tif").shape == (96, 96)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = write_label_image(tmp_path / "l.tif", np.ones((4, 4), np.uint16))
    old = path.read_bytes()

    def broken(tmp):
        tmp.write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.tif"]


def test_protected_input_is_refused_by_every_name(tmp_path):
    real = tmp_path / "data" / "x.tif"
    real.parent.mkdir()
    real.write_bytes(b"input")
    (tmp_path / "alias").symlink_to(tmp_path / "data")  # the same folder under another name
    protect_inputs([real])
    try:
        for path in (real, tmp_path / "alias" / "x.tif"):
            with pytest.raises(FileExistsError, match="refusing to overwrite an input"):
                write_label_image(path, np.zeros((2, 2), np.uint16))
    finally:
        protect_inputs([])
    assert real.read_bytes() == b"input"


def test_run_where_every_file_was_skipped_fails(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises((RuntimeError, ValueError), match="all 2 input file"):
        _predict(tmp_path, f"input={folder}", f"output={tmp_path / 'o'}")


def test_run_level_tables_never_replace_an_input_table(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", _nuclei(4))
    (folder / "measurements.csv").write_text("my own spreadsheet\n")
    with pytest.raises(FileExistsError, match="measurements.csv: refusing to overwrite an input"):
        _predict(tmp_path, f"input={folder}", f"output={folder}", "measure=true")
    assert (folder / "measurements.csv").read_text() == "my own spreadsheet\n"
