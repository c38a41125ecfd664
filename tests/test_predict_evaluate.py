"""evaluate.py and predict.py round trips on a tiny checkpoint, for every image format the data layer reads."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellrcnn import predict as predict_module
from cellrcnn.evaluate import metrics_table
from cellrcnn.evaluate import run as evaluate_run
from cellrcnn.io import ImageReadError, read_label_image
from cellrcnn.predict import resolve_checkpoint
from cellrcnn.predict import run as predict_run
from cellrcnn.train import compose_config
from cellrcnn.train import run as train_run

DATA = ["data.synthetic.n_train=4", "data.synthetic.n_val=2", "data.synthetic.n_test=2", "data.synthetic.size=96"]
TINY = [
    *DATA, "data.crop_size=96", "data.batch_size=2", "model.net.fpn_channels=32", "model.net.returned_layers=[1,2,3]",
    "model.net.rpn_post_nms_top_n_train=200", "model.net.box_batch_size_per_image=32",
    "model.net.rpn_post_nms_top_n_test=100", "model.net.box_detections_per_img=100", "model.coco_metrics=false",
    "logger=none", "threads=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, dataset root) of a Mask R-CNN trained for two steps on 96 px synthetic images."""
    tmp = tmp_path_factory.mktemp("train")
    root = tmp / "data"
    cfg = compose_config("train", [f"data.root={root}", *TINY, "trainer.max_steps=2", "test=false"], tmp / "run")
    train_run(cfg)
    return tmp / "run" / "checkpoints" / "last.ckpt", root


def test_evaluate_writes_metrics_and_overlays(trained, tmp_path):
    ckpt, root = trained
    cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "data=synthetic", f"data.root={root}", *DATA, "overlays=2", "threads=1"], tmp_path)
    metrics = evaluate_run(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["n_images"] == 2 == len(saved["per_image"])
    assert saved["metrics"]["dsb_score"] == pytest.approx(metrics["dsb_score"])
    assert "| dsb_score |" in (tmp_path / "metrics.md").read_text()
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2


def test_evaluate_precision_option(trained, tmp_path):
    """precision= as in predict.py: float32 and bfloat16 both score; an unknown value is named."""
    ckpt, root = trained
    base = [f"ckpt_path={ckpt}", "data=synthetic", f"data.root={root}", *DATA, "overlays=0", "threads=1"]
    scores = {}
    for precision in ("float32", "bfloat16"):
        (tmp_path / precision).mkdir()
        scores[precision] = evaluate_run(compose_config("evaluate", [*base, f"precision={precision}"],
                                                        tmp_path / precision))["dsb_score"]
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="precision must be one of"):
        evaluate_run(compose_config("evaluate", [*base, "precision=half"], tmp_path / "bad"))


def test_metrics_table_formats():
    table = metrics_table({"n_images": 3.0, "dsb_score": 0.51234, "segm_AP": float("nan")}, "t")
    assert table.splitlines()[4:] == ["| dsb_score | 0.5123 |", "| segm_AP | n/a |", "| n_images | 3 |"]


@pytest.fixture()
def images(tmp_path):
    """A folder with an 8-bit RGBA PNG, a 16-bit TIFF, a grayscale PNG, an RGB JPEG and a notes file
    named like an image; returns (folder, expected stems)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    base = np.zeros((80, 72), np.float32)
    yy, xx = np.mgrid[:80, :72]
    for cy, cx in ((20, 20), (50, 40), (30, 55)):
        base[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 1.0
    base += rng.normal(0, 0.05, base.shape).astype(np.float32)
    u8 = (np.clip(base, 0, 1) * 200 + 20).astype(np.uint8)
    rgba = np.dstack([u8, u8 // 2, u8, np.full_like(u8, 255)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    tifffile.imwrite(folder / "deep.tif", (np.clip(base, 0, 1) * 3000 + 500).astype(np.uint16))
    Image.fromarray(u8, "L").save(folder / "grey.png")
    Image.fromarray(np.dstack([u8] * 3), "RGB").save(folder / "colour.jpg", quality=95)
    (folder / "notes.png").write_text("not an image")
    return folder, {"rgba", "deep", "grey", "colour"}


def test_predict_every_format_and_skips_unreadable(trained, images, tmp_path, capsys):
    ckpt, _ = trained
    folder, stems = images
    out = tmp_path / "out"
    cfg = compose_config("predict", [f"ckpt_path={ckpt}", f"input={folder}", f"output={out}", "threads=1"], tmp_path)
    summary = predict_run(cfg)
    for stem in stems:
        labels = read_label_image(out / f"{stem}.tif")
        assert labels.shape == (80, 72)
        assert (out / f"{stem}_overlay.png").is_file()
    assert tifffile.imread(out / "rgba.tif").dtype == np.uint16
    assert [Path(s["file"]).name for s in summary["skipped"]] == ["notes.png"]
    assert "notes.png" in summary["skipped"][0]["error"] and "notes.png" in capsys.readouterr().out
    results = json.loads((out / "coco_results.json").read_text())
    assert len(results) == sum(im["n_objects"] for im in summary["images"])
    assert json.loads((out / "predictions.json").read_text())["skipped"] == summary["skipped"]


def test_predict_image_without_cells_writes_empty_labels(trained, tmp_path):
    ckpt, _ = trained
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 30, np.uint8)).save(blank)
    # a threshold above every score: the zero-object path (no masks at all) end to end
    cfg = compose_config("predict", [f"ckpt_path={ckpt}", f"input={blank}", f"output={tmp_path / 'o'}",
                                     "score_threshold=1.01", "measure=true"], tmp_path)
    summary = predict_run(cfg)
    labels = tifffile.imread(tmp_path / "o" / "blank.tif")
    assert labels.shape == (64, 64) and labels.dtype == np.uint16 and labels.max() == 0
    assert summary["images"][0]["n_objects"] == 0
    assert json.loads((tmp_path / "o" / "coco_results.json").read_text()) == []


def test_predict_and_evaluate_at_a_given_diameter(trained, tmp_path):
    """The checkpoint records the training objects' median diameter; diameter=2x that halves the
    image for the model, and the labels come back at the image's own size."""
    import torch

    from cellrcnn.inference.scale import annotation_diameter

    ckpt, root = trained
    saved = torch.load(ckpt, weights_only=False)
    model_diameter = saved["hyper_parameters"]["object_diameter"]
    assert model_diameter == pytest.approx(annotation_diameter(root / "annotations" / "train.json"))
    image = sorted((root / "images").iterdir())[0]
    cfg = compose_config("predict", [f"ckpt_path={ckpt}", f"input={image}", f"output={tmp_path / 'o'}",
                                     f"diameter={2 * model_diameter}", "overlays=false"], tmp_path)
    summary = predict_run(cfg)
    assert summary["images"][0]["factor"] == pytest.approx(0.5)
    assert read_label_image(tmp_path / "o" / f"{image.stem}.tif").shape == Image.open(image).size[::-1]

    (tmp_path / "e").mkdir()
    cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "data=synthetic", f"data.root={root}", *DATA, "overlays=0",
                                      "diameter=auto"], tmp_path / "e")
    assert evaluate_run(cfg)["n_images"] == 2

    del saved["hyper_parameters"]["object_diameter"]  # as in checkpoints older than the option
    torch.save(saved, tmp_path / "old.ckpt")
    cfg = compose_config("predict", [f"ckpt_path={tmp_path / 'old.ckpt'}", f"input={image}",
                                     f"output={tmp_path / 'o2'}", "diameter=auto"], tmp_path)
    with pytest.raises(ValueError, match="old.ckpt.*object_diameter"):
        predict_run(cfg)


def test_predict_inverts_bright_backgrounds_for_a_model_trained_so(trained, tmp_path):
    """The checkpoint records the data module's ``invert_bright``; with it set, predict.py gives a
    dark-on-bright picture exactly the labels of the same picture bright-on-dark (two grey levels,
    so percentile normalisation maps both to the same input)."""
    import torch

    ckpt, _ = trained
    saved = torch.load(ckpt, weights_only=False)
    assert saved["hyper_parameters"]["invert_bright"] is False  # recorded from the data module
    assert saved["hyper_parameters"]["hematoxylin"] is False
    saved["hyper_parameters"]["invert_bright"] = True
    torch.save(saved, tmp_path / "inverted.ckpt")
    yy, xx = np.mgrid[:96, :96]
    disks = ((yy - 30) ** 2 + (xx - 30) ** 2 < 100) | ((yy - 60) ** 2 + (xx - 66) ** 2 < 144)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.where(disks, 40, 215).astype(np.uint8)).save(folder / "bright.png")
    Image.fromarray(np.where(disks, 215, 40).astype(np.uint8)).save(folder / "dark.png")

    def labels(checkpoint, out):
        predict_run(compose_config("predict", [f"ckpt_path={checkpoint}", f"input={folder}", f"output={tmp_path / out}",
                                               "score_threshold=0.0", "overlays=false"], tmp_path))
        return {stem: read_label_image(tmp_path / out / f"{stem}.tif") for stem in ("bright", "dark")}

    inverted, plain = labels(tmp_path / "inverted.ckpt", "inverted"), labels(ckpt, "plain")
    assert plain["dark"].max() > 0 and not np.array_equal(plain["bright"], plain["dark"])
    np.testing.assert_array_equal(inverted["bright"], plain["dark"])
    np.testing.assert_array_equal(inverted["dark"], plain["dark"])


def test_a_model_trained_on_hematoxylin_density_loads_and_predicts_so(trained, tmp_path):
    """A checkpoint with ``hematoxylin`` recorded loads, reports it in its input settings, and
    predict.py feeds a stained field as its stain density: the nuclei are found as in the same
    picture drawn as bright nuclei on dark (whose mean grey is all the plain model sees)."""
    import torch

    from cellrcnn.io import _RGB_FROM_HED
    from cellrcnn.modules.base import load_module

    ckpt, _ = trained
    saved = torch.load(ckpt, weights_only=False)
    saved["hyper_parameters"]["hematoxylin"] = True
    torch.save(saved, tmp_path / "hema.ckpt")
    assert load_module(tmp_path / "hema.ckpt").input_settings["hematoxylin"] is True
    yy, xx = np.mgrid[:96, :96]
    disks = ((yy - 30) ** 2 + (xx - 30) ** 2 < 100) | ((yy - 60) ** 2 + (xx - 66) ** 2 < 144)
    density = np.where(disks, 1.0, 0.0)[..., None] * _RGB_FROM_HED[0] + 0.3 * _RGB_FROM_HED[1]
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.round(255 * np.exp(-density)).astype(np.uint8)).save(folder / "stained.png")
    Image.fromarray(np.where(disks, 215, 40).astype(np.uint8)).save(folder / "dark.png")

    def labels(checkpoint, out, stem):
        predict_run(compose_config("predict", [f"ckpt_path={checkpoint}", f"input={folder}", f"output={tmp_path / out}",
                                               "score_threshold=0.0", "overlays=false"], tmp_path))
        return read_label_image(tmp_path / out / f"{stem}.tif")

    found = labels(tmp_path / "hema.ckpt", "hema", "stained")
    np.testing.assert_array_equal(found, labels(ckpt, "plain", "dark"))
    assert found.max() > 0


def test_predict_single_non_image_names_the_file(trained, tmp_path):
    ckpt, _ = trained
    bad = tmp_path / "table.csv"
    bad.write_text("a,b\n1,2\n")
    cfg = compose_config("predict", [f"ckpt_path={ckpt}", f"input={bad}", f"output={tmp_path / 'o'}"], tmp_path)
    with pytest.raises(ImageReadError, match="table.csv"):
        predict_run(cfg)


def test_shipped_checkpoint_missing_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(predict_module, "SHIPPED_CHECKPOINT", tmp_path / "weights" / "nuclei.ckpt")
    with pytest.raises(FileNotFoundError, match="pass ckpt_path="):
        resolve_checkpoint(None)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "nuclei.ckpt").write_bytes(b"")
    assert resolve_checkpoint(None) == tmp_path / "weights" / "nuclei.ckpt"
    assert resolve_checkpoint("given.ckpt") == Path("given.ckpt")


def test_predict_measures_flags_and_exports(trained, images, tmp_path, monkeypatch):
    """measure=true, anomaly=true and exports=[geojson,imagej]: every table and file agrees with the label images."""
    import pandas as pd
    import roifile

    ckpt, _ = trained
    folder, stems = images
    out = tmp_path / "out"
    monkeypatch.setattr(predict_module, "MIN_CELLS_FOR_ANOMALY", 1)  # a tiny model finds few cells
    cfg = compose_config("predict", [f"ckpt_path={ckpt}", f"input={folder}", f"output={out}", "threads=1",
                                     "measure=true", "anomaly=true", "pixel_size=0.5", "score_threshold=0.0",
                                     "exports=[geojson,imagej]"], tmp_path)
    summary = predict_run(cfg)
    table = pd.read_csv(out / "measurements.csv")
    per_image = pd.read_csv(out / "summary.csv").set_index("image")
    assert set(per_image.index) == {Path(im["file"]).name for im in summary["images"]}  # zero-cell images too
    for im in summary["images"]:
        labels = read_label_image(out / im["labels"])
        n = len(np.unique(labels[labels > 0]))
        name, stem = Path(im["file"]).name, Path(im["labels"]).stem
        assert (table["image"] == name).sum() == n == per_image.loc[name, "count"]
        assert len(json.loads((out / f"{stem}.geojson").read_text())["features"]) == n
        rois = roifile.roiread(out / f"{stem}_rois.zip") if n else []
        assert len(rois if isinstance(rois, list) else [rois]) == n
    assert "area_um2" in table.columns and len(table) > 0  # score_threshold=0 keeps every detection
    assert {"anomaly_score", "is_anomalous"} <= set(table.columns)
    assert (out / "shape_anomaly_model.pt").is_file()
    # the flags reach QuPath and Fiji: class "Nucleus: anomalous" / ROI name "<label>-anomalous"
    for im in summary["images"]:
        rows = table[table["image"] == Path(im["file"]).name].set_index("label")
        stem = Path(im["labels"]).stem
        for feature in json.loads((out / f"{stem}.geojson").read_text())["features"]:
            props = feature["properties"]
            flagged = bool(rows.loc[int(props["name"]), "is_anomalous"])
            assert (props["classification"]["name"] == "Nucleus: anomalous") == flagged
            assert props["measurements"]["anomaly_score"] == pytest.approx(rows.loc[int(props["name"]), "anomaly_score"])
        if len(rows):
            rois = roifile.roiread(out / f"{stem}_rois.zip")
            named = {int(r.name.split("-")[0]): r.name.endswith("-anomalous") for r in (rois if isinstance(rois, list) else [rois])}
            assert named == {int(k): bool(v) for k, v in rows["is_anomalous"].items()}
