"""predict.py over a folder: predicting into the input folder again takes none of the earlier run's
outputs for images, and what a folder holds besides images (other files, subfolders) is reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellrcnn.config import compose_config
from cellrcnn.errors import UsageError
from cellrcnn.io import read_label_image
from cellrcnn.predict import output_pairs
from cellrcnn.predict import run as predict_run


def _nuclei(seed: int, size: int = 64) -> np.ndarray:
    """A dark field with a few bright disks, 8-bit."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), 20.0)
    for cy, cx in rng.integers(12, size - 12, (3, 2)):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 40] = 200
    return (image + rng.normal(0, 3, image.shape)).clip(0, 255).astype(np.uint8)


def _predict(tmp_path: Path, folder: Path, *overrides: str, out: Path | None = None) -> dict:
    args = [f"input={folder}", f"output={out or folder}", "model=nuclei", "threads=1", *overrides]
    return predict_run(compose_config("predict", args, tmp_path / "run"))


def _record(folder: Path) -> dict:
    return json.loads((folder / "predictions.json").read_text())


def _counts(record: dict) -> dict[str, int]:
    return {Path(entry["file"]).name: entry["n_objects"] for entry in record["images"]}


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_predicting_twice_into_the_input_folder_gives_the_same_result(tmp_path, capsys):
    """The reported case: the second run took fluo.tif and fluo_overlay.png for images, and failed
    on coco_results.json (a file of the input folder, so protected as an input)."""
    folder = tmp_path / "same"
    folder.mkdir()
    Image.fromarray(_nuclei(0)).save(folder / "fluo.png")
    first = _predict(tmp_path, folder)
    labels = read_label_image(folder / "fluo.tif")
    capsys.readouterr()

    second = _predict(tmp_path, folder)

    assert _counts(_record(folder)) == _counts(first) == {"fluo.png": first["images"][0]["n_objects"]}
    assert [entry["labels"] for entry in second["images"]] == ["fluo.tif"]
    np.testing.assert_array_equal(read_label_image(folder / "fluo.tif"), labels)
    assert not list(folder.glob("*_overlay_overlay.png")) and not list(folder.glob("*_pred*"))
    assert _listing(folder) == {"fluo.png", "fluo.tif", "fluo_overlay.png", "coco_results.json",
                                "predictions.json"}
    out = capsys.readouterr().out
    assert "ignored 4 files that an earlier run of predict wrote here" in out
    assert _record(folder)["earlier_outputs"] == ["coco_results.json", "fluo.tif", "fluo_overlay.png",
                                                  "predictions.json"]


def test_rerun_keeps_the_users_files_as_inputs_and_writes_the_same_files(tmp_path):
    """A TIFF input (its labels are <stem>_pred.tif), an image of the user's named like an overlay,
    a notes file, tables and exports: a rerun writes over its own files and reads every input again."""
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", _nuclei(1).astype(np.uint16) * 50)
    Image.fromarray(_nuclei(2)).save(folder / "b.png")
    Image.fromarray(_nuclei(3)).save(folder / "b_overlay.png")  # the user's, not an overlay
    (folder / "notes.txt").write_text("stain: DAPI\n")
    options = ("measure=true", "exports=[geojson]")
    first = _predict(tmp_path, folder, *options)
    files = _listing(folder)

    second = _predict(tmp_path, folder, *options)

    assert _counts(second) == _counts(first) and set(_counts(second)) == {"a.tif", "b.png", "b_overlay.png"}
    assert [e["labels"] for e in second["images"]] == [e["labels"] for e in first["images"]]
    assert _listing(folder) == files  # nothing piles up
    assert (folder / "notes.txt").read_text() == "stain: DAPI\n"
    assert {"measurements.csv", "summary.csv"} <= set(second["outputs"])
    assert str(folder / "notes.txt") in second["ignored"] and "notes.txt" not in second["earlier_outputs"]


def test_a_folder_left_by_the_earlier_version_is_read_right(tmp_path, capsys):
    """A predictions.json without the ``outputs`` keys, and the label image / overlay pairs the
    failed second runs of the earlier version left (fluo_pred.tif, fluo_overlay.tif, ...)."""
    folder = tmp_path / "same"
    folder.mkdir()
    Image.fromarray(_nuclei(0)).save(folder / "fluo.png")
    first = _predict(tmp_path, folder)
    record = _record(folder)
    for key in ("outputs", "earlier_outputs"):
        record.pop(key)
    for entry in record["images"]:
        entry.pop("outputs")
    (folder / "predictions.json").write_text(json.dumps(record))
    for stem in ("fluo_pred", "fluo_pred2", "fluo_overlay"):
        (folder / f"{stem}.tif").write_bytes((folder / "fluo.tif").read_bytes())
        (folder / f"{stem}_overlay.png").write_bytes((folder / "fluo_overlay.png").read_bytes())
    capsys.readouterr()

    second = _predict(tmp_path, folder)

    assert _counts(second) == _counts(first)
    out = capsys.readouterr().out
    assert "ignored 4 files that an earlier run of predict wrote here" in out
    assert "ignored 6 files that look like an earlier run's outputs" in out
    assert not list(folder.glob("*_overlay_overlay_overlay.png")) and not list(folder.glob("*_pred3*"))


def test_without_a_record_only_pairs_made_from_an_image_are_left_out(tmp_path, capsys):
    folder = tmp_path / "same"
    folder.mkdir()
    Image.fromarray(_nuclei(0)).save(folder / "fluo.png")
    _predict(tmp_path, folder)
    (folder / "predictions.json").unlink()
    (folder / "coco_results.json").unlink()
    capsys.readouterr()

    second = _predict(tmp_path, folder)

    assert list(_counts(second)) == ["fluo.png"]
    assert "ignored 2 files that look like an earlier run's outputs" in capsys.readouterr().out
    assert second["earlier_outputs"] == ["fluo.tif", "fluo_overlay.png"]


def test_output_pairs_need_both_files_and_a_source_image():
    def pairs(*names: str) -> set[str]:
        return output_pairs([Path("f") / name for name in names])

    assert pairs("x.png", "x.tif", "x_overlay.png") == {"x.tif", "x_overlay.png"}
    assert pairs("a.tif", "a_pred.tif", "a_pred_overlay.png", "a_pred2.tif", "a_pred2_overlay.png") == {
        "a_pred.tif", "a_pred_overlay.png", "a_pred2.tif", "a_pred2_overlay.png"}
    assert pairs("c.png", "c.jpg", "c_jpg.tif", "c_jpg_overlay.png") == {"c_jpg.tif", "c_jpg_overlay.png"}
    assert pairs("b.png", "b_overlay.png") == set()  # the user's image named like an overlay
    assert pairs("y.tif", "y_overlay.png") == set()  # no image they were made from
    assert pairs("z.png", "z.tif") == set()  # a label image without its overlay may be an image


def test_a_run_over_nothing_but_earlier_outputs_fails(tmp_path):
    folder = tmp_path / "same"
    folder.mkdir()
    Image.fromarray(_nuclei(0)).save(folder / "fluo.png")
    _predict(tmp_path, folder)
    (folder / "fluo.png").unlink()
    before = _record(folder)
    with pytest.raises(UsageError, match="no images to segment"):
        _predict(tmp_path, folder)
    assert _record(folder) == before  # the record of the earlier run is kept


def test_a_users_own_predictions_json_stops_the_run_before_any_image(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_nuclei(0)).save(folder / "a.png")
    (folder / "predictions.json").write_text('{"my": "notes"}')
    with pytest.raises(FileExistsError, match="predictions.json: refusing to overwrite an input") as error:
        _predict(tmp_path, folder)
    assert isinstance(error.value, UsageError)  # the command prints it without a traceback, exit 2
    assert _listing(folder) == {"a.png", "predictions.json"}
    assert (folder / "predictions.json").read_text() == '{"my": "notes"}'


def test_files_and_subfolders_a_folder_input_ignores_are_reported(tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / ".git").mkdir()
    Image.fromarray(_nuclei(0)).save(folder / "img.png")
    Image.fromarray(_nuclei(1)).save(folder / "sub" / "deeper.png")
    (folder / "a.czi").write_bytes(b"ZISRAWFILE")
    (folder / "notes.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"")

    summary = _predict(tmp_path, folder, out=folder / "results")  # the output folder inside the input

    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("ignored")] == [
        "ignored 2 files that are not an image of a supported format (.png, .tif, .tiff, .jpg, .jpeg, .bmp): "
        "a.czi, notes.txt",
        "ignored 1 subfolder: sub/ (subfolders are not searched; give one as input= to segment it)",
    ]
    assert summary["ignored"] == [str(folder / "a.czi"), str(folder / "notes.txt"), str(folder / "sub") + "/"]
    assert _record(folder / "results")["ignored"] == summary["ignored"]
    assert list(_counts(summary)) == ["img.png"]


def test_notes_and_warnings_of_odd_images_reach_the_report(tmp_path, capsys):
    """Replaced NaN pixels and a resize beyond the limits are said once per image and kept in
    predictions.json (``notes``), not printed as Python warning lines; an image too small to hold a
    nucleus of the training size is flagged."""
    folder = tmp_path / "in"
    folder.mkdir()
    with_nan = _nuclei(1).astype(np.float32)
    with_nan[:4, :4] = np.nan
    tifffile.imwrite(folder / "nan.tif", with_nan)
    Image.fromarray(_nuclei(2)[:8, :8]).save(folder / "tiny.png")
    record = _predict(tmp_path, folder, "diameter=5000", out=tmp_path / "out")
    by_name = {Path(entry["file"]).name: entry for entry in record["images"]}
    assert any("16 non-finite pixel(s) replaced" in note for note in by_name["nan.tif"]["notes"])
    assert all(any("limited to 0.25×" in note for note in entry["notes"]) for entry in by_name.values())
    assert any("only 8×8 px" in w for w in by_name["tiny.png"]["warnings"])
    printed = capsys.readouterr()
    assert "nan.tif: 16 non-finite pixel(s) replaced" in printed.out and "warnings.warn" not in printed.err


def test_a_failed_run_leaves_no_file_protected(tmp_path):
    """After a run that fails (every file unreadable), the next writes in this thread are free."""
    from cellrcnn.io import ImageReadError, is_protected

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_text("not a png")
    with pytest.raises(ImageReadError):
        _predict(tmp_path, folder, out=tmp_path / "out")
    assert not is_protected(folder / "a.png")


def test_a_users_file_in_the_output_folder_is_kept_and_a_rerun_replaces_only_its_own(tmp_path, capsys):
    """The user's ground truth cells.tif in the output folder survives byte-identical: the label
    image goes to cells_pred.tif, which the record lists, and a rerun writes over its own files."""
    Image.fromarray(_nuclei(0)).save(tmp_path / "cells.png")
    out = tmp_path / "out"
    out.mkdir()
    tifffile.imwrite(out / "cells.tif", (_nuclei(0) > 100).astype(np.uint16))
    (out / "notes.txt").write_text("ground truth by hand\n")
    truth = (out / "cells.tif").read_bytes()

    first = _predict(tmp_path, tmp_path / "cells.png", out=out)

    assert (out / "cells.tif").read_bytes() == truth
    assert [entry["labels"] for entry in first["images"]] == ["cells_pred.tif"]
    assert _record(out)["images"][0]["outputs"] == ["cells_pred.tif", "cells_pred_overlay.png"]
    assert _record(out)["kept"] == ["cells.tif"]  # notes.txt is no name an output could have
    assert (f"kept 1 file already in {out} that no run of predict wrote: cells.tif; outputs that would have "
            "its name get _pred") in capsys.readouterr().out
    files = _listing(out)

    second = _predict(tmp_path, tmp_path / "cells.png", out=out)

    assert [entry["labels"] for entry in second["images"]] == ["cells_pred.tif"]
    assert _listing(out) == files and not list(out.glob("*_pred2*"))  # no pile-up
    assert (out / "cells.tif").read_bytes() == truth
    assert (out / "notes.txt").read_text() == "ground truth by hand\n"
    assert "kept 1 file" in capsys.readouterr().out and _record(out)["kept"] == ["cells.tif"]


def test_outputs_a_later_run_does_not_rewrite_stay_known_as_outputs(tmp_path):
    """The first run's GeoJSON, which a second run without exports leaves, is carried on in the
    record (``earlier_outputs``): a third run with exports replaces it instead of keeping it."""
    Image.fromarray(_nuclei(0)).save(tmp_path / "cells.png")
    out = tmp_path / "out"
    _predict(tmp_path, tmp_path / "cells.png", "exports=[geojson]", out=out)
    _predict(tmp_path, tmp_path / "cells.png", out=out)
    third = _predict(tmp_path, tmp_path / "cells.png", "exports=[geojson]", out=out)
    assert [entry["labels"] for entry in third["images"]] == ["cells.tif"] and third["kept"] == []
    assert _listing(out) == {"cells.tif", "cells_overlay.png", "cells.geojson", "coco_results.json",
                             "predictions.json"}


def test_unrecorded_pairs_of_this_runs_images_are_replaced(tmp_path):
    """A run into another folder that left no record (it crashed): its label image and overlay,
    named after an image of this run, are recognised and replaced rather than kept."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_nuclei(0)).save(folder / "fluo.png")
    out = tmp_path / "out"
    _predict(tmp_path, folder, out=out)
    for name in ("predictions.json", "coco_results.json"):
        (out / name).unlink()
    second = _predict(tmp_path, folder, out=out)
    assert [entry["labels"] for entry in second["images"]] == ["fluo.tif"] and second["kept"] == []
    assert second["earlier_outputs"] == ["fluo.tif", "fluo_overlay.png"]


@pytest.mark.parametrize("same_folder", [False, True])
def test_a_run_file_no_record_lists_stops_the_run_before_any_image(tmp_path, same_folder, capsys):
    """coco_results.json left without its predictions.json (deleted): not the user's input, and not
    known to be predict's; the run stops before predicting, says so, and leaves every file as it was."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_nuclei(0)).save(folder / "fluo.png")
    out = folder if same_folder else tmp_path / "out"
    _predict(tmp_path, folder, out=out)
    (out / "predictions.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(FileExistsError) as error:
        _predict(tmp_path, folder, out=out)
    message = str(error.value)
    assert message.startswith(f"{out / 'coco_results.json'}: ") and "input" not in message
    assert "not written by a recorded run of predict" in message
    assert "move it away or choose another output folder" in message
    assert isinstance(error.value, UsageError)  # the command prints it without a traceback, exit 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert "objects" not in capsys.readouterr().out  # stopped before any image was predicted


def test_a_second_run_into_the_folder_keeps_the_story_of_the_first_runs_files(tmp_path, capsys):
    """Run 1 predicts a and b into out/, run 2 only b: a's outputs stay, and the record still says
    what made them (``earlier_images``); a third run that predicts a again takes it back."""
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        Image.fromarray(_nuclei(seed)).save(tmp_path / name / f"{name}.png")
    both = tmp_path / "both"
    both.mkdir()
    for name in ("a", "b"):
        (both / f"{name}.png").write_bytes((tmp_path / name / f"{name}.png").read_bytes())
    out = tmp_path / "out"
    first = _predict(tmp_path, both, out=out)
    capsys.readouterr()
    second = _predict(tmp_path, tmp_path / "b", out=out)
    said = capsys.readouterr().out
    assert [Path(e["file"]).name for e in second["images"]] == ["b.png"]
    carried = _record(out)["earlier_images"]
    assert carried == [next(e for e in first["images"] if e["labels"] == "a.tif")]
    assert "outputs of 1 image an earlier run predicted (a.png)" in said
    _predict(tmp_path, tmp_path / "a", out=out)  # b's outputs are carried, a's are this run's again
    record = _record(out)
    assert [e["labels"] for e in record["images"]] == ["a.tif"]
    assert [e["labels"] for e in record["earlier_images"]] == ["b.tif"]


def test_model_auto_names_each_images_model_and_the_non_commercial_one_on_screen(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(_nuclei(3)).save(folder / "fluo.png")
    he = np.zeros((64, 64, 3), np.uint8) + np.array([235, 210, 225], np.uint8)  # pink tissue, purple nuclei
    he[10:20, 10:20] = (80, 40, 130)
    Image.fromarray(he).save(folder / "tissue.png")
    summary = predict_run(compose_config("predict", [f"input={folder}", f"output={tmp_path / 'out'}", "threads=1"],
                                         tmp_path / "run"))
    said = capsys.readouterr().out
    assert {Path(e["file"]).name: e["model"] for e in summary["images"]} == {"fluo.png": "nuclei",
                                                                              "tissue.png": "nuclei_he"}
    assert " by nuclei -> " in said and " by nuclei_he -> " in said
    assert "1 image (tissue.png): colour-stained image (H&E-like); nuclei_he's weights are for non-commercial" in said


def test_a_rerun_replaces_outputs_named_as_inputs_of_another_folder(tmp_path, capsys):
    """input=tiffs/ (x.tif) output=out/ writes out/x.tif; the same run again replaces out/x.tif
    (an output, though named as an input of the other folder) instead of keeping it as the user's
    and writing x_pred.tif beside it, which a scoring by file name would never read."""
    (tmp_path / "tiffs").mkdir()
    tifffile.imwrite(tmp_path / "tiffs" / "x.tif", _nuclei(4))
    out = tmp_path / "out"
    _predict(tmp_path, tmp_path / "tiffs", out=out)
    capsys.readouterr()
    second = _predict(tmp_path, tmp_path / "tiffs", out=out)
    assert [e["labels"] for e in second["images"]] == ["x.tif"] and second["kept"] == []
    assert _listing(out) == {"x.tif", "x_overlay.png", "coco_results.json", "predictions.json"}
    assert "kept" not in capsys.readouterr().out
