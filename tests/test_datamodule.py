"""CellDataModule: batch format, crops, deterministic sampling with and without workers, hash splits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from cellrcnn.data.datamodule import (
    CellDataModule,
    appearance_key,
    balanced_weights,
    collate,
    split_by_hash,
    split_coco_file,
)
from cellrcnn.data.synthetic import generate_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_dataset(
        tmp_path_factory.mktemp("dm") / "syn", n_train=6, n_val=2, n_test=2, size=96, seed=0
    )


def _epoch(dm: CellDataModule) -> list:
    return [
        (torch.stack([i.sum() for i in images]), [t["masks"].sum() for t in targets])
        for images, targets in dm.train_dataloader()
    ]


def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b, strict=True))


def test_batches_are_lists_train_cropped_eval_full(root):
    dm = CellDataModule(root, crop_size=64, batch_size=4)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 4
    for image, target in zip(images, targets, strict=True):
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert target["masks"].shape[1:] == (64, 64) and target["boxes"].dtype == torch.float32
    images, targets = next(iter(dm.val_dataloader()))
    assert [i.shape for i in images] == [(3, 96, 96)] * 2 and targets[0]["masks"].shape[1:] == (96, 96)
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 2
    assert collate([]) == ([], [])


def test_no_augmentation_gives_dataset_samples(root):
    dm = CellDataModule(root, augment=False, channels=1, batch_size=1)
    dm.setup("fit")
    base = dm.datasets["train"].base
    seen = {
        t["image_id"]: i
        for images, targets in dm.train_dataloader()
        for i, t in zip(images, targets, strict=True)
    }
    for k in range(len(base)):
        image, target = base[k]
        assert torch.equal(seen[target["image_id"]], image) and image.shape == (1, 96, 96)


def test_acquisition_jitter_only_on_augmented_training_samples(root):
    from cellrcnn.data.transforms import AcquisitionJitter

    def jitter(dm):
        dm.setup("fit")
        transforms = getattr(dm.datasets["train"], "transforms", None)
        return [t.p for t in getattr(transforms, "transforms", []) if isinstance(t, AcquisitionJitter)]

    assert jitter(CellDataModule(root, acquisition_p=0.25)) == [0.25]
    assert jitter(CellDataModule(root)) == [] and jitter(CellDataModule(root, acquisition_p=0.25, augment=False)) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_deterministic_under_seed(root, workers):
    runs = []
    for seed in (1, 1, 2):
        dm = CellDataModule(root, crop_size=48, batch_size=2, num_workers=workers, seed=seed)
        dm.setup("fit")
        runs.append((_epoch(dm), _epoch(dm)))  # two epochs from the same module
    assert _same(runs[0][0], runs[1][0]) and _same(runs[0][1], runs[1][1])
    assert not _same(runs[0][0], runs[0][1])  # a new epoch draws new augmentations
    assert not _same(runs[0][0], runs[2][0])


def test_ranks_draw_different_augmentations(root):
    epochs = []
    for rank in (0, 1):
        dm = CellDataModule(root, crop_size=48, batch_size=2, seed=1)
        dm.trainer = SimpleNamespace(global_rank=rank)  # what a DDP trainer provides
        dm.setup("fit")
        epochs.append(_epoch(dm))
    assert not _same(*epochs)


def test_runs_under_lightning_trainer(root):
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = 0

        def training_step(self, batch, _):
            images, targets = batch
            self.seen += len(images)
            return sum((i.mean() - self.w) ** 2 for i in images)

        def validation_step(self, batch, _):
            images, targets = batch
            assert images[0].shape[-2:] == (96, 96)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=CellDataModule(root, crop_size=32, batch_size=3))
    assert model.seen == 6


def test_prepare_data_generates_synthetic(tmp_path):
    dm = CellDataModule(tmp_path / "gen", synthetic={"n_train": 1, "n_val": 1, "n_test": 1, "size": 64})
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 1 and len(dm.datasets["val"]) == 1


def test_split_by_hash_is_deterministic_and_stable():
    ids = list(range(20_000))
    train, val = split_by_hash(ids, (0.9, 0.1), salt="dsb2018")
    assert len(train) + len(val) == 20_000 and not set(train) & set(val)
    assert abs(len(val) / 20_000 - 0.1) < 0.01
    assert split_by_hash(ids[::-1], (0.9, 0.1), salt="dsb2018")[1] == val[::-1]  # order-independent
    grown = split_by_hash(ids + list(range(20_000, 21_000)), (0.9, 0.1), salt="dsb2018")[1]
    assert set(val) <= set(grown)  # new ids never move old ones
    assert split_by_hash(ids, (0.9, 0.1), salt="other")[1] != val
    assert [len(g) for g in split_by_hash(["a", "b"], (1, 0, 0))] == [2, 0, 0]
    with pytest.raises(ValueError):
        split_by_hash(ids, (0, 0))


def test_split_coco_file(root, tmp_path):
    paths = split_coco_file(
        root / "annotations" / "train.json", ("a", "b"), (0.5, 0.5), salt="x", out_dir=tmp_path
    )
    parts = [json.loads(p.read_text()) for p in paths]
    whole = json.loads((root / "annotations" / "train.json").read_text())
    ids = [{im["id"] for im in p["images"]} for p in parts]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {im["id"] for im in whole["images"]}
    for p, keep in zip(parts, ids, strict=True):
        assert all(a["image_id"] in keep for a in p["annotations"])
    assert sum(len(p["annotations"]) for p in parts) == len(whole["annotations"])
    assert np.isclose(len(ids[0]) + len(ids[1]), 6)


def test_appearance_key_tells_acquisition_groups_apart():
    rng = np.random.default_rng(0)
    fluorescence = rng.integers(0, 30, (40, 50)).astype(np.uint16)
    fluorescence[10:20, 10:20] = 4000  # bright nuclei on a dark background, 16-bit
    grey_as_rgb = np.repeat((255 - fluorescence // 16).astype(np.uint8)[..., None], 3, axis=-1)
    stained = np.full((40, 50, 4), 230, np.uint8)  # pink background, purple nuclei, with alpha
    stained[..., 1] = 180
    stained[10:20, 10:20, :3] = (90, 40, 150)
    assert appearance_key(fluorescence) == (40, 50, False, False)
    assert appearance_key(grey_as_rgb) == (40, 50, False, True)
    assert appearance_key(stained) == (40, 50, True, True)


def test_balanced_weights_are_inverse_sqrt_of_group_size():
    weights = balanced_weights(["a", "a", "a", "a", "b"])
    assert weights.sum() == pytest.approx(1.0)
    assert weights[4] / weights[0] == pytest.approx(2.0)  # 1/sqrt(1) against 1/sqrt(4)


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    """Five 64×64 fluorescence fields and one 80×80 stained field, one square nucleus each."""
    from PIL import Image

    from cellrcnn.data.converters.common import mask_annotation

    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(6):
        size = 80 if i == 5 else 64
        raw = np.zeros((size, size, 3), np.uint8) + (np.array([230, 180, 230], np.uint8) if i == 5 else 0)
        raw[20:40, 20:40] = (90, 40, 150) if i == 5 else (200, 200, 200)
        Image.fromarray(raw).save(root / "images" / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": size, "width": size})
        mask = np.zeros((size, size), np.uint8)
        mask[20:40, 20:40] = 1
        annotations.append({**mask_annotation(mask), "id": i + 1, "image_id": i + 1})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "nucleus"}]}
    (root / "annotations" / "train.json").write_text(json.dumps(coco))
    return root


def test_appearance_balance_draws_the_rare_group_more_often(mixed_root):
    dm = CellDataModule(
        mixed_root, val_split=None, test_split=None, augment=False, batch_size=1, balance="appearance", seed=3
    )
    weights = dm.sample_weights()
    assert weights[5] / weights[0] == pytest.approx(5**0.5)
    draws = [t["image_id"] for _ in range(60) for _, targets in dm.train_dataloader() for t in targets]
    assert len(draws) == 360  # an epoch still has as many samples as images
    # expected share of the stained image: 1 / (1 + 5 / sqrt(5)) = 0.31, against 1/6 unbalanced
    assert 0.25 < draws.count(6) / len(draws) < 0.37
    with pytest.raises(ValueError, match="balance"):
        CellDataModule(mixed_root, balance="modality")


def test_invert_bright_gives_every_modality_bright_nuclei(mixed_root):
    """The stained field (purple nucleus on pink-white) reaches the model inverted, nucleus bright;
    the fluorescence fields are unchanged."""
    samples = {}
    for invert in (False, True):
        dm = CellDataModule(mixed_root, val_split=None, test_split=None, augment=False, channels=1, invert_bright=invert)
        dm.setup("fit")
        samples[invert] = [dm.datasets["train"][i][0][0].numpy() for i in range(6)]
    stained = samples[True][5]
    assert stained[20:40, 20:40].mean() > 0.9 and stained[:20].mean() < 0.1
    assert samples[False][5][20:40, 20:40].mean() < 0.1
    for i in range(5):
        np.testing.assert_array_equal(samples[True][i], samples[False][i])


def test_hematoxylin_input_and_calibration_images_of_one_modality(mixed_root):
    """With ``hematoxylin`` the stained field reaches the model as stain density (nucleus bright,
    pink-white background dark, no inversion needed) and the fluorescence fields as without it;
    ``CalibrationSamples(modality=...)`` keeps the images of that appearance across files."""
    from cellrcnn.evaluation.calibrate import CalibrationSamples

    dm = CellDataModule(mixed_root, val_split=None, test_split=None, augment=False, channels=1, hematoxylin=True)
    dm.setup("fit")
    stained = dm.datasets["train"][5][0][0].numpy()
    assert stained[20:40, 20:40].mean() > 0.9 and stained[:20].mean() < 0.1
    plain = CellDataModule(mixed_root, val_split=None, test_split=None, augment=False, channels=1)
    plain.setup("fit")
    np.testing.assert_array_equal(dm.datasets["train"][0][0], plain.datasets["train"][0][0])

    train = mixed_root / "annotations" / "train.json"
    he = CalibrationSamples([train, train], None, None, channels=1, hematoxylin=True, modality="H&E")
    assert len(he) == 2
    for image, target in he:
        assert image.shape == (1, 80, 80) and image[0, 20:40, 20:40].mean() > 0.9 and len(target["masks"]) == 1
    assert len(CalibrationSamples([train, train], None, None)) == 12
    assert len(CalibrationSamples(train, None, 3, modality="fluorescence")) == 3
    with pytest.raises(ValueError, match="modality"):
        CalibrationSamples(train, None, None, modality="phase")
