"""Several sources in one run: sampling shares, the common nucleus size, per-source validation,
the training images recorded in checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellrcnn.data.mixed import (
    ID_STRIDE,
    MixedDataModule,
    image_diameters,
    resize_factors,
    source_of_image_id,
)
from cellrcnn.data.synthetic import generate_dataset


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("mix")
    return {
        "alpha": generate_dataset(base / "alpha", n_train=6, n_val=2, n_test=2, size=96, seed=0),
        "beta": generate_dataset(base / "beta", n_train=3, n_val=1, n_test=1, size=96, seed=1),
    }


def _module(roots, **kwargs) -> MixedDataModule:
    sources = {"alpha": {"root": roots["alpha"], "weight": 3.0}, "beta": {"root": roots["beta"], "weight": 1.0}}
    return MixedDataModule(sources, crop_size=64, batch_size=2, eval_batch_size=1, **kwargs)


def test_each_source_gets_its_share_of_draws_whatever_its_size(roots):
    dm = _module(roots)
    weights = dm.sample_weights()
    assert len(weights) == 9 and weights.sum() == pytest.approx(1.0)
    assert weights[:6].sum() == pytest.approx(0.75) and weights[6:].sum() == pytest.approx(0.25)
    images, targets = next(iter(dm.train_dataloader()))
    assert [tuple(i.shape) for i in images] == [(3, 64, 64)] * 2


def test_images_are_resized_towards_one_nucleus_size(roots):
    dm = _module(roots, target_diameter=30.0, rescale_strength=1.0, max_rescale=1.5, augment=False)
    dm.setup("validate")
    (_, alpha, factors), _ = dm.eval_sets("val")
    diameters = image_diameters(alpha)
    assert np.all(np.isfinite(diameters)) and np.all(diameters > 3)
    assert factors == pytest.approx(np.clip(30.0 / diameters, 1 / 1.5, 1.5))
    image, target = dm.datasets["val"][0][0]
    assert tuple(image.shape[1:]) == (round(96 * factors[0]),) * 2 == tuple(target["masks"].shape[1:])
    half = _module(roots, target_diameter=30.0, rescale_strength=0.5, max_rescale=8.0)
    assert half.eval_sets("val")[0][2] == pytest.approx(np.sqrt(30.0 / diameters))  # halfway in log scale
    assert resize_factors(np.array([np.nan, 10.0]), 40.0, 1.0, 2.0) == pytest.approx([1.0, 2.0])
    assert resize_factors(np.array([10.0]), None, 1.0, 2.0) == pytest.approx([1.0])


def test_training_crops_follow_each_images_factor(roots):
    dm = _module(roots, target_diameter=200.0, rescale_strength=1.0, max_rescale=4.0, scale_range=None)
    dm.setup("fit")
    first = dm.datasets["train"].datasets[0]
    assert first.factors == pytest.approx(np.full(6, 4.0))  # small synthetic nuclei, clipped at 4x
    image, target = first[0]
    n_native = len(first.base.load_target(0)["masks"])
    assert tuple(image.shape) == (3, 64, 64) and 0 < len(target["masks"]) <= n_native


def test_every_source_is_degraded_when_acquisition_p_is_set(roots):
    from cellrcnn.data.transforms import AcquisitionJitter

    dm = _module(roots, acquisition_p=0.4)
    dm.setup("fit")
    for part in dm.datasets["train"].datasets:
        steps = part._transforms(part.factors[0]).transforms
        assert [t.p for t in steps if isinstance(t, AcquisitionJitter)] == [0.4]
    with pytest.raises(ValueError, match="acquisition_p"):
        _module(roots, acquisition_p=1.5)


def test_one_validation_loader_per_source_with_ids_kept_apart(roots):
    dm = _module(roots)
    loaders = dm.val_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [2, 1]
    ids = [int(t["image_id"]) for loader in loaders for _, targets in loader for t in targets]
    assert [source_of_image_id(i, dm.source_names) for i in ids] == ["alpha", "alpha", "beta"]
    assert ids[2] >= ID_STRIDE > ids[1]
    assert len(dm.calibration_samples(2)) == 2  # spread over both sources: one each
    assert {source_of_image_id(int(t["image_id"]), dm.source_names) for _, t in dm.calibration_samples(2)} == {
        "alpha", "beta"}


def test_a_source_set_to_null_is_left_out_and_bad_weights_refused(roots):
    dm = MixedDataModule({"alpha": {"root": roots["alpha"]}, "beta": None})
    assert dm.source_names == ["alpha"]
    with pytest.raises(ValueError, match="weights must be positive"):
        MixedDataModule({"alpha": {"root": roots["alpha"], "weight": 0}})
    with pytest.raises(ValueError, match="no source"):
        MixedDataModule({"beta": None})


@pytest.mark.slow
def test_training_logs_per_source_metrics_and_records_training_images(roots, tmp_path):
    from cellrcnn.config import compose_config
    from cellrcnn.data.splits import file_digest
    from cellrcnn.modules.base import load_module
    from cellrcnn.train import run

    overrides = [
        "experiment=nuclei_unet", "trainer=cpu", "trainer.max_steps=2", "trainer.max_time=null",
        "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1", "model.net.base_width=8",
        f"data.sources.bbbc038.root={roots['alpha']}", f"data.sources.sbsst265.root={roots['beta']}",
        "data.crop_size=64", "data.batch_size=2", "data.num_workers=0", "logger=none", "calibrate=0",
    ]
    metrics = run(compose_config("train", overrides, tmp_path))
    for source in ("bbbc038", "sbsst265"):  # the sources' names, beside the pooled figures
        assert 0.0 <= metrics[f"test/{source}/dsb_score"] <= 1.0
    assert metrics["test/n_images"] == 3 and metrics["test/bbbc038/n_images"] == 2
    model = load_module(tmp_path / "checkpoints" / "last.ckpt")
    train_images = sorted((roots["alpha"] / "images").glob("train_*")) + sorted((roots["beta"] / "images").glob("train_*"))
    assert model.training_images == sorted({file_digest(p) for p in train_images})
    expected = compose_config("train", overrides, tmp_path)  # the median size the model trained at
    from hydra.utils import instantiate

    assert model.object_diameter == pytest.approx(instantiate(expected.data).training_object_diameter())
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["cellrcnn_training_images"] == model.training_images


@pytest.mark.slow
def test_evaluate_reports_each_source_and_flags_training_images(roots, tmp_path):
    import json

    from cellrcnn.config import compose_config
    from cellrcnn.evaluate import run as evaluate
    from cellrcnn.train import run

    sources = [f"data.sources.bbbc038.root={roots['alpha']}", f"data.sources.sbsst265.root={roots['beta']}",
               "data.sources.monuseg=null"]
    run(compose_config("train", [
        "experiment=nuclei_unet", "trainer=cpu", "trainer.max_steps=1", "trainer.max_time=null",
        "model.net.base_width=8", "data.crop_size=64", "data.num_workers=0", "logger=none", "calibrate=0",
        "test=false", *sources], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for split, seen in (("train", 9), ("test", 0)):
        out = tmp_path / split
        evaluate(compose_config("evaluate", [f"ckpt_path={ckpt}", "data=nuclei_mix", *sources, f"split={split}",
                                             "diameter=gt", "overlays=0", "threads=1"], out))
        result = json.loads((out / "metrics.json").read_text())
        assert len(result["seen_in_training"]) == seen
        by_source = {r["group"]: r["n_images"] for r in result["by_group"] if r["field"] == "source"}
        assert by_source == ({"bbbc038": 6, "sbsst265": 3} if split == "train" else {"bbbc038": 2, "sbsst265": 1})
        assert ("training set" in (out / "metrics.md").read_text()) == bool(seen)
