"""Smoke runs of the benchmark scripts (tiny budgets and sizes) and the shipped nuclei model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "cellrcnn" / "weights" / "nuclei.ckpt"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_speed_smoke(tmp_path):
    speed = _load_script("speed")
    result = speed.main(["--models", "cell,unet", "--batch", "1", "--crop", "64", "--big", "96", "--warmup", "1",
                         "--iters", "1", "--infer-iters", "1", "--big-iters", "1", "--threads", "1",
                         "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert set(saved["rows"]) == {"maskrcnn_cell", "unet"}
    cell = saved["rows"]["maskrcnn_cell"]
    assert cell["max_detections"] >= 1000  # the preset must be able to return crowded fields
    assert cell["train_img_per_s"] > 0 and cell["infer_ms_per_MP"] > 0
    assert result["env_start"]["torch_threads"] == 1 and "load average" in result["env_start"]["uptime"]
    assert "| maskrcnn_cell |" in (tmp_path / "speed.md").read_text()


def test_speed_stock_model_keeps_torchvision_defaults():
    speed = _load_script("speed")

    class Args:
        maskrcnn_ckpt = None
        unet_ckpt = None

    (stock,) = speed.build_runners(["stock"], Args)
    assert stock.stock and stock.model.transform.min_size == (800,)
    assert stock.model.roi_heads.detections_per_img == 100
    assert stock.model.roi_heads.score_thresh == 0.0  # saturated comparison (see the script's docstring)


def test_dsb_split_is_deterministic_by_image_id(tmp_path):
    from cellrcnn.data.synthetic import generate_dataset

    dsb = _load_script("dsb2018")
    root = generate_dataset(tmp_path / "syn", n_train=12, n_val=4, n_test=4, size=64, seed=1)
    counts = dsb.write_split(Path(root))
    assert sum(counts.values()) == 20
    train = json.loads((Path(root) / "annotations" / "dsb_train90.json").read_text())
    val = json.loads((Path(root) / "annotations" / "dsb_val10.json").read_text())
    ids_train, ids_val = {im["id"] for im in train["images"]}, {im["id"] for im in val["images"]}
    assert not ids_train & ids_val and len(ids_train | ids_val) == 20
    assert all(a["image_id"] in ids_val for a in val["annotations"])
    # an image's split depends only on its ImageId: the same rule gives the same answer
    from cellrcnn.data.datamodule import split_by_hash

    stems = sorted(Path(im["file_name"]).stem for im in train["images"] + val["images"])
    expect_val = set(split_by_hash(stems, (0.9, 0.1), salt=dsb.SALT)[1])
    assert {Path(im["file_name"]).stem for im in val["images"]} == expect_val
    assert dsb.write_split(Path(root)) == counts  # re-running changes nothing


def test_dsb_breakdown_by_modality():
    dsb = _load_script("dsb2018")
    rows = [{"dsb_score": 0.5, "tp": 3, "fp": 1, "fn": 0}, {"dsb_score": 0.1, "tp": 1, "fp": 0, "fn": 3},
            {"dsb_score": 0.9, "tp": 2, "fp": 0, "fn": 0}]
    by = dsb.breakdown(rows, ["fluorescence", "fluorescence", "brightfield (grey)"])
    # pooled over the group's objects: tp 4, fp 1, fn 3 -> f1 = 8 / 12
    assert by["fluorescence"] == {"n_images": 2, "dsb_score": pytest.approx(0.3), "f1@0.5": pytest.approx(8 / 12)}
    assert by["brightfield (grey)"]["f1@0.5"] == 1.0
    fluorescence = np.zeros((32, 32), np.uint16)
    fluorescence[8:16, 8:16] = 1000
    stained = np.full((32, 32, 3), 230, np.uint8)
    stained[..., 1] = 170
    stained[8:16, 8:16] = (90, 40, 150)
    assert dsb.modality(fluorescence) == "fluorescence"
    assert dsb.modality((1000 - fluorescence) // 4) == "brightfield (grey)"
    assert dsb.modality(stained) == "stained (H&E, colour)"


@pytest.mark.slow
def test_dsb_benchmark_smoke(tmp_path):
    """Both trainings through train.py (a few steps), evaluation and the results tables."""
    from cellrcnn.data.synthetic import generate_dataset

    dsb = _load_script("dsb2018")
    root = generate_dataset(tmp_path / "syn", n_train=6, n_val=2, n_test=2, size=64, seed=2)
    out = tmp_path / "results"
    dsb.main(["--budget-min", "1", "--root", str(root), "--runs", str(tmp_path / "runs"), "--out", str(out),
              "--eval-limit", "2", "--override", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "data.batch_size=2", "data.crop_size=64", "data.num_workers=0", "logger=none"])
    saved = json.loads((out / "dsb2018.json").read_text())
    assert set(saved["results"]) == {"maskrcnn", "unet", "classical"}
    for metrics in saved["results"].values():
        assert 0.0 <= metrics["dsb_score"] <= 1.0 and metrics["infer_s_per_image"] > 0
    assert saved["results"]["maskrcnn"]["global_step"] >= 1  # trained through train.py
    by_modality = saved["results"]["unet"]["by_modality"]
    scored = min(2, saved["meta"]["n_val"])  # --eval-limit 2
    assert sum(group["n_images"] for group in by_modality.values()) == scored  # every scored image in one group
    table = (out / "dsb2018.md").read_text()
    assert "Otsu + watershed" in table and "dsb_score" in table and "by imaging modality" in table
    # re-scoring with the existing calibration: no new calibration file, the same figures
    calibrated = tmp_path / "runs" / "unet" / "checkpoints" / "calibrated.ckpt"
    stamp = calibrated.stat().st_mtime_ns
    dsb.main(["--skip-train", "--reuse-calibration", "--root", str(root), "--runs", str(tmp_path / "runs"),
              "--out", str(out), "--eval-limit", "2"])
    again = json.loads((out / "dsb2018.json").read_text())
    assert calibrated.stat().st_mtime_ns == stamp
    assert again["results"]["unet"]["dsb_score"] == pytest.approx(saved["results"]["unet"]["dsb_score"])
    assert again["results"]["unet"]["calibration"] == saved["results"]["unet"]["calibration"]


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="no shipped model in cellrcnn/weights")
def test_shipped_model_loads_and_finds_synthetic_nuclei():
    from cellrcnn.evaluation.evaluator import Evaluator
    from cellrcnn.modules.base import load_module

    speed = _load_script("speed")
    assert WEIGHTS.stat().st_size <= 25 * 2**20
    torch.set_num_threads(1)
    model = load_module(WEIGHTS)
    channels = int(dict(model.hparams)["net"]["in_channels"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    evaluator = Evaluator(coco=False)
    for seed in (11, 12):
        image, target = speed.synthetic_sample(seed, 256, channels)
        pred = model.predict_instances([image])[0]
        assert pred["masks"].shape[-2:] == (256, 256) and pred["masks"].dtype == torch.uint8
        evaluator.update(target, pred)
    metrics = evaluator.compute()
    # trained on DSB2018 only, it still finds most procedural nuclei (an untrained net scores ~0)
    assert metrics["f1@0.5"] > 0.5, metrics
    assert np.isfinite(metrics["dsb_score"])


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="no shipped model in cellrcnn/weights")
def test_robustness_changes_images_as_another_microscope_would_and_scores_each(tmp_path):
    """Every change keeps the image's size (magnification resizes image and truth together), and
    the benchmark scores each source under each change and diameter mode with the shipped model."""
    from cellrcnn.data.synthetic import generate_dataset
    from cellrcnn.modules.base import load_module

    bench = _load_script("robustness")
    raw = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    for change in bench.CHANGES:
        if change not in bench.SCALE:
            assert bench.change_image(raw, change, np.random.default_rng(1)).shape == raw.shape
    camera = bench.change_image(raw, "camera16", np.random.default_rng(1))
    assert camera.dtype == np.uint16 and camera.min() >= 100 and camera.max() <= 1100
    vignette = bench.change_image(np.full((40, 50), 200, np.uint8), "vignette", np.random.default_rng(1))
    assert int(vignette[20, 25]) == pytest.approx(200, abs=1) and int(vignette[0, 0]) == pytest.approx(100, abs=6)

    assert 8 < load_module(WEIGHTS).object_diameter < 40  # DSB2018 nuclei: a median of about 17 px
    generate_dataset(tmp_path / "coco" / "syn", n_train=1, n_val=1, n_test=2, size=96, seed=3)
    bench.main(["--model", str(WEIGHTS), "--coco-root", str(tmp_path / "coco"), "--sources", "syn,absent",
                "--changes", "none,half,blur", "--diameters", "default,null", "--threads", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "robustness.json").read_text())["rows"]
    assert {(r["source"], r["change"], r["diameter"]) for r in rows} == {
        ("syn", c, d) for c in ("none", "half", "blur") for d in ("default", "null")}
    assert all(0.0 <= r["dsb_score"] <= 1.0 and r["n_images"] == 2 for r in rows)
    by = {(r["change"], r["diameter"]): r for r in rows}
    assert by["none", "null"]["f1@0.5"] > 0.5  # the shipped model finds the procedural nuclei
    assert "| syn | half: 2× lower magnification | default | 2 |" in (tmp_path / "robustness.md").read_text()


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="no shipped model in cellrcnn/weights")
def test_watershed_sweep_smoke(tmp_path):
    """Every grid point is scored on both splits and the choice is the best on the training split."""
    from cellrcnn.data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "syn", n_train=2, n_val=1, n_test=1, size=96, seed=4)
    result = _load_script("watershed_sweep").main(
        ["--ckpt", str(WEIGHTS), "--root", str(root), "--train-split", "train", "--held-out-split", "test",
         "--grid", "smooth_per_diameter=0,0.1", "--grid", "boundary_weight=0,0.5", "--name", "sweep",
         "--threads", "1", "--out", str(tmp_path)]
    )
    points = [(r["smooth_per_diameter"], r["boundary_weight"]) for r in result["rows"]]
    assert points == [(0.0, 0.0), (0.0, 0.5), (0.1, 0.0), (0.1, 0.5)]
    assert result["n_train"] == 2 and result["n_held_out"] == 1
    assert result["chosen"] == max(result["rows"], key=lambda r: r["train"])
    assert all(0.0 <= r[k] <= 1.0 for r in result["rows"] for k in ("train", "held_out"))
    assert "| 0.10 | 0.50 |" in (tmp_path / "sweep.md").read_text()


def test_watershed_sweep_grid_parsing():
    sweep = _load_script("watershed_sweep")
    assert sweep.parse_grid(["h=0.02,0.05", "boundary_weight=1"]) == {"h": [0.02, 0.05], "boundary_weight": [1.0]}
    with pytest.raises(SystemExit, match="NAME=V1"):
        sweep.parse_grid(["h"])


def test_generalist_table_merges_runs_per_source(tmp_path):
    generalist = _load_script("generalist")

    def run(dsb, f1):
        rows = [{"field": "source", "group": g, "n_images": n, "dsb_score": dsb, "f1@0.5": f1, "pq@0.5": 0.5}
                for g, n in (("bbbc038", 64), ("sbsst265", 4))]
        return {"pooled": {"n_images": 68, "dsb_score": dsb, "f1@0.5": f1, "pq@0.5": 0.5}, "by_group": rows,
                "seen_in_training": 0}

    for name, dsb in (("a", 0.5), ("b", 0.6)):
        generalist.write(tmp_path / name, {f"{name}, diameter=null": run(dsb, 0.8)}, "cmd", "test")
    generalist.main(["--merge", str(tmp_path / "a" / "generalist.json"), str(tmp_path / "b" / "generalist.json"),
                     "--out", str(tmp_path / "both")])
    md = (tmp_path / "both" / "generalist.md").read_text()
    assert "| sbsst265 (4) | 0.500 / 0.800 / 0.500 | 0.600 / 0.800 / 0.500 |" in md
    assert "| all (68) |" in md and len(json.loads((tmp_path / "both" / "generalist.json").read_text())) == 2
    assert "Where accuracy is lost" not in md  # runs without the size metrics: no error table


def test_generalist_error_table_from_the_evaluators_size_metrics(tmp_path):
    from cellrcnn.evaluation import Evaluator

    generalist = _load_script("generalist")
    gt = np.zeros((80, 80), np.int32)
    gt[0:6, 0:6], gt[10:16, 0:6], gt[30:70, 30:70] = 1, 2, 3  # two 6.8-px nuclei, one 45-px
    pred = np.zeros_like(gt)
    pred[0:6, 0:6], pred[30:70, 30:50], pred[30:70, 50:70] = 5, 6, 7  # one small missed, the large split
    ev = Evaluator(coco=False, extra_metrics=True)
    ev.update_labels(gt, pred, image_id=0)
    rows = [{"field": "source", "group": "bbbc038", **ev.compute()}]
    generalist.write(tmp_path, {"m, diameter=null": {"pooled": rows[0], "by_group": rows, "seen_in_training": 0}},
                     "cmd", "test")
    md = (tmp_path / "generalist.md").read_text()
    assert "| bbbc038 | m, diameter=null | 2, 0.50, 1.00 | – | 1, 1.00, 0.50 | – | 1 | 0 |" in md


def test_predict_speed_scores_label_tiffs_against_coco_masks_and_builds_a_16bit_field(tmp_path):
    """bench/predict_speed.py's known answers: a COCO polygon becomes the same label image, a
    perfect prediction scores dsb 1.0, and the large field is uint16 of the asked size, tiled from
    grey fluorescence images only."""
    from PIL import Image

    speed = _load_script("predict_speed")
    from cellrcnn.evaluation.matching import dsb_score

    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    image = {"height": 40, "width": 50, "annotations": [{"segmentation": square}]}
    labels = speed.gt_labels(image)
    assert labels.shape == (40, 50) and set(np.unique(labels)) == {0, 1} and 380 <= (labels == 1).sum() <= 441
    assert dsb_score(labels, labels) == 1.0

    yy, xx = np.mgrid[:60, :70]
    grey = np.where((yy - 30) ** 2 + (xx - 35) ** 2 < 100, 200, 10).astype(np.uint8)
    stained = np.stack([np.full((60, 70), 200), np.full((60, 70), 120), np.full((60, 70), 190)], -1).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(stained).save(tmp_path / "stained.png")
    images = [{"path": tmp_path / "grey.png"}, {"path": tmp_path / "stained.png"}]
    field = speed.big_field(150, images, tmp_path)
    from cellrcnn.io import read_image

    pixels = read_image(field)
    assert pixels.shape == (150, 150) and pixels.dtype == np.uint16
    assert len(np.unique(pixels)) == 2  # only the grey disk image, tiled (the stained one is skipped)


def test_predict_speed_times_a_shipped_model_or_a_checkpoint_file():
    speed = _load_script("predict_speed")
    assert speed.model_arg("nuclei_he") == ["model=nuclei_he"]
    assert speed.model_arg("auto") == []
    assert speed.model_arg("mrcnn=outputs/run/checkpoints/calibrated.ckpt") == [
        "ckpt_path=outputs/run/checkpoints/calibrated.ckpt"]


def test_inference_backends_agree_with_float32_on_a_small_unet():
    import torch

    from cellrcnn.models.unet import UNet

    backends = _load_script("inference_backends")
    net = UNet(in_channels=1, depth=2, base_width=8).eval()
    x = torch.rand(1, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    builders = backends.backends(net, x)
    reference = backends.probabilities(builders["float32"]()())
    assert reference.shape == (1, 3, 64, 64)
    for name in ("autocast", "bf16"):
        diff = (backends.probabilities(builders[name]()()) - reference).abs().max()
        assert 0 < float(diff) < 0.05, name  # reduced precision: close, not identical
    assert backends.best_of(lambda: None, 2) >= 0


def test_maskrcnn_limits_anchor_iou_and_mask_round_trip():
    limits = _load_script("maskrcnn_limits")
    grid = limits.anchor_grid([8, 16], [1.0])
    assert [stride for stride, _, _ in grid] == [4, 8]
    # a 16×16 box centred on a stride-8 grid point: the 16-px square anchor fits it exactly;
    # shifted by 4 px (half a stride) in x and y the best anchor overlaps (12·12) / (2·256 − 144)
    boxes = np.array([[8.0, 8, 24, 24], [12, 12, 28, 28]])
    np.testing.assert_allclose(limits.best_anchor_iou(boxes, grid), [1.0, 144 / 368])
    # a 2:1 anchor of the same area (22.6 × 11.3 px) overlaps the shifted box more
    assert limits.best_anchor_iou(boxes[1:], limits.anchor_grid([8, 16], [0.5, 1.0]))[0] > 0.4
    yy, xx = np.mgrid[:60, :60]
    disk = (yy - 30) ** 2 + (xx - 30) ** 2 <= 15**2
    ys, xs = np.nonzero(disk)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    ious = limits.mask_head_iou(disk, box)
    assert 0.9 < ious["torchvision"] < ious["cellrcnn@0.4"] and ious["cellrcnn@0.4"] > 0.98
    assert limits.size_bins(np.array([5.0, 12.0, 30, 80])).tolist() == [0, 1, 2, 3]


def test_maskrcnn_limits_torchvision_label_image_paints_by_score():
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from cellrcnn.data.masks import masks_to_label_image

    limits = _load_script("maskrcnn_limits")
    probs = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[10.0, 12, 40, 30], [20, 15, 45, 35], [0, 0, 15, 9], [30, 20, 50, 40], [5, 5, 25, 25]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.7, 0.6])
    labels = limits.torchvision_label_image(probs, boxes, scores, (48, 64), 0.5, chunk=2)
    expected = masks_to_label_image((paste_masks_in_image(probs, boxes, (48, 64))[:, 0] > 0.5).numpy(), scores.numpy())
    np.testing.assert_array_equal(labels, expected)


def test_tile_overlap_field_carries_its_annotations_along(tmp_path):
    """bench/tile_overlap.py tiles images and their annotations alike: every tiled disk is one
    labelled object, and no two copies share a label."""
    from PIL import Image

    bench = _load_script("tile_overlap")
    yy, xx = np.mgrid[:60, :70]
    Image.fromarray(np.where((yy - 30) ** 2 + (xx - 35) ** 2 < 100, 200, 10).astype(np.uint8)).save(tmp_path / "g.png")
    disk = [[25.0, 20.0, 45.0, 20.0, 45.0, 40.0, 25.0, 40.0]]  # a square over the disk, 20 px wide
    image = {"path": tmp_path / "g.png", "height": 60, "width": 70, "annotations": [{"segmentation": disk}]}
    field, labels = bench.annotated_field(140, [image])
    assert field.shape == labels.shape == (140, 140) and field.dtype == np.uint16
    assert len(np.unique(labels)) - 1 == 4  # 2 × 2 whole copies (the field cuts the rest short of them)
    assert (field[labels > 0] > 2000).mean() > 0.7  # the labels lie on the bright disks
