"""Paired transforms: every mask stays aligned with its box and with the image, deterministically."""

from __future__ import annotations

import numpy as np
import pytest

from cellrcnn.data.masks import masks_to_boxes_xyxy
from cellrcnn.data.transforms import (
    AcquisitionJitter,
    Compose,
    IntensityJitter,
    RandomCrop,
    RandomFlip,
    RandomRot90,
    RandomScale,
    build_train_transforms,
)

H, W = 50, 70  # non-square on purpose


def _sample(h: int = H, w: int = W):
    """Image whose channel 0 is the union of the masks and channel 1 the box-only box, so
    geometric transforms can be checked against the image; channel 2 is a column ramp."""
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for cy, cx, ry, rx in [(10, 10, 6, 9), (30, 50, 8, 5), (45, 66, 6, 6), (25, 5, 3, 3), (12, 34, 2, 3)]:
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8))
    masks.append(np.zeros((h, w), np.uint8))  # box-only instance
    masks = np.stack(masks)
    has_mask = np.array([True] * 5 + [False])
    boxes = masks_to_boxes_xyxy(masks)
    boxes[5] = [20, 35, 40, 48]
    image = np.zeros((3, h, w), np.float32)
    image[0] = masks.max(axis=0)
    image[1, 35:48, 20:40] = 1
    image[2] = xx
    target = {
        "boxes": boxes,
        "labels": np.arange(1, 7, dtype=np.int64),
        "masks": masks,
        "has_mask": has_mask,
        "image_id": 3,
    }
    return image, target


def _check_aligned(image: np.ndarray, target: dict, exact_image: bool = True) -> None:
    n = len(target["labels"])
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == np.float32
    assert target["masks"].shape == (n, *image.shape[1:]) and target["masks"].dtype == np.uint8
    assert target["has_mask"].shape == (n,) and target["image_id"] == 3
    hm = target["has_mask"]
    np.testing.assert_array_equal(target["boxes"][hm], masks_to_boxes_xyxy(target["masks"][hm]))
    assert target["masks"][~hm].sum() == 0
    h, w = image.shape[1:]
    b = target["boxes"]
    assert np.all(b[:, 0] >= 0) and np.all(b[:, 2] <= w) and np.all(b[:, 1] >= 0) and np.all(b[:, 3] <= h)
    assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
    if exact_image:  # pixel-exact transforms: the image moved exactly like the masks
        union = target["masks"].max(axis=0) if n else np.zeros((h, w))
        assert np.all(image[0] >= union)  # every mask pixel is still an object pixel of the image
        if 6 in target["labels"]:
            ys, xs = np.nonzero(image[1])
            box = target["boxes"][target["labels"] == 6][0]
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomCrop(32, min_area=10),
        lambda: RandomCrop((40, 64), min_area=0),
        lambda: RandomCrop(96),  # larger than the image: padded
        lambda: RandomFlip(),
        lambda: RandomRot90(),
        lambda: Compose([RandomCrop(40), RandomFlip(), RandomRot90()]),
    ],
    ids=["crop32", "crop40x64", "pad96", "flip", "rot90", "chain"],
)
def test_geometry_keeps_masks_boxes_and_image_aligned(make, seed):
    image, target = _sample()
    out_image, out = make()(image, target, np.random.default_rng(seed))
    _check_aligned(out_image, out)
    if out_image.shape[1:] == (H, W) or out_image.shape[1:] == (W, H):  # flips/rotations lose nothing
        assert len(out["labels"]) == 6 and np.array_equal(out_image[0], out["masks"].max(axis=0))


@pytest.mark.parametrize("seed", range(8))
def test_scale_and_full_pipeline_alignment(seed):
    image, target = _sample()
    rng = np.random.default_rng(seed)
    out_image, out = RandomScale((0.5, 2.0))(image, target, rng)
    _check_aligned(out_image, out, exact_image=False)
    t = build_train_transforms(crop_size=48, scale_range=(0.7, 1.4), invert_p=0.5)
    out_image, out = t(image, target, rng)
    assert out_image.shape == (3, 48, 48) and out_image.dtype == np.float32
    _check_aligned(out_image, out, exact_image=False)


def test_flip_and_rot90_known_answers():
    image, target = _sample()
    for k in range(4):
        # a generator whose first draw is k, then compare with numpy's own rotation
        seed = next(s for s in range(100) if int(np.random.default_rng(s).integers(0, 4)) == k)
        out_image, out = RandomRot90()(image, target, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_image, np.rot90(image, k, axes=(1, 2)))
        np.testing.assert_array_equal(out["masks"], np.rot90(target["masks"], k, axes=(1, 2)))
        assert out_image.shape[1:] == ((H, W) if k % 2 == 0 else (W, H))
    flip_h = RandomFlip(horizontal=True, vertical=False, p=1.0)
    out_image, out = flip_h(image, target, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image[:, :, ::-1])
    assert out["boxes"][5].tolist() == [W - 40, 35, W - 20, 48]
    flip_v = RandomFlip(horizontal=False, vertical=True, p=1.0)
    out_image, out = flip_v(image, target, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    assert out["boxes"][5].tolist() == [20, H - 48, 40, H - 35]


def test_crop_drops_only_instances_cut_below_min_area():
    image, target = _sample()
    crop = RandomCrop((H, 40), min_area=20)
    whole_area = target["masks"].sum(axis=(1, 2))
    for seed in range(30):
        out_image, out = crop(image, target, np.random.default_rng(seed))
        x0 = int(out_image[2, 0, 0])  # the column ramp gives the crop offset
        area = target["masks"][:, :, x0 : x0 + 40].sum(axis=(1, 2))
        box = target["boxes"][5]
        area[5] = max(0, min(box[2], x0 + 40) - max(box[0], x0)) * (box[3] - box[1])
        whole_area[5] = (box[2] - box[0]) * (box[3] - box[1])
        expected = [i + 1 for i in range(6) if area[i] > 0 and (area[i] >= 20 or area[i] == whole_area[i])]
        assert out["labels"].tolist() == expected, (seed, x0, area)
    # a whole object smaller than min_area is kept: instance 5 (label 5) has about 15 pixels
    assert 0 < whole_area[4] < 20
    _, out = RandomCrop((H, W), min_area=20)(image, target, np.random.default_rng(0))
    assert 5 in out["labels"]


def test_crop_pads_with_zeros_or_reflection():
    image, target = _sample(20, 30)
    out_image, out = RandomCrop(40)(image + 1, target, np.random.default_rng(1))
    assert out_image.shape == (3, 40, 40) and (out_image[0] == 0).sum() == 40 * 40 - 20 * 30
    out_image, _ = RandomCrop(40, pad_mode="reflect")(image + 1, target, np.random.default_rng(1))
    assert np.all(out_image[0] >= 1)
    with pytest.raises(ValueError):
        RandomCrop(4, pad_mode="wrap")


def test_empty_target_passes_every_transform():
    image = np.random.default_rng(0).random((1, 30, 20), dtype=np.float32)
    target = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "masks": np.zeros((0, 30, 20), np.uint8),
        "has_mask": np.zeros(0, bool),
        "image_id": 3,
    }
    t = build_train_transforms(crop_size=16, scale_range=(0.8, 1.2))
    out_image, out = t(image, target, np.random.default_rng(0))
    assert (
        out_image.shape == (1, 16, 16) and out["masks"].shape == (0, 16, 16) and out["boxes"].shape == (0, 4)
    )


def test_intensity_jitter_known_answers():
    image, target = _sample()
    out, same = IntensityJitter(p=0.0, invert_p=1.0)(image, target, np.random.default_rng(0))
    np.testing.assert_array_equal(out, 1.0 - image)
    assert same is target
    out, _ = IntensityJitter(p=1.0, gamma=(2, 2), gain=(3, 3), offset=(0.5, 0.5), noise_std=(0, 0))(
        image, target, np.random.default_rng(0)
    )
    np.testing.assert_allclose(out[0], image[0] ** 2 * 3 + 0.5)


def test_acquisition_jitter_blurs_within_each_channel_and_adds_poisson_noise():
    image, target = _sample()
    same, kept = AcquisitionJitter(p=0.0)(image, target, np.random.default_rng(0))
    assert same is image and kept is target
    blurred, kept = AcquisitionJitter(p=1.0, blur_sigma=(1.5, 1.5), blur_p=1.0, noise_p=0.0)(
        image, target, np.random.default_rng(0))
    assert kept is target and blurred.shape == image.shape
    # each channel is blurred on its own: the column ramp stays a ramp, the masks' edges soften,
    # and no light moves between channels (their sums stay put, up to the reflected borders)
    np.testing.assert_allclose(blurred[2, 25, 10:60], image[2, 25, 10:60], atol=1e-4)
    assert 0.1 < blurred[0, 10, 19] < 0.9 and image[0, 10, 19] == 1
    np.testing.assert_allclose(blurred[:2].sum(axis=(1, 2)), image[:2].sum(axis=(1, 2)), rtol=0.02)
    flat = np.full((1, 200, 200), 0.5, np.float32)
    noisy, _ = AcquisitionJitter(p=1.0, blur_p=0.0, photons=(20, 20), noise_p=1.0)(flat, target, np.random.default_rng(1))
    # Poisson counts at 0.5 × 20 photons: mean 0.5, standard deviation sqrt(10) / 20
    assert abs(noisy.mean() - 0.5) < 0.01 and abs(noisy.std() - np.sqrt(10) / 20) < 0.01
    assert np.allclose(noisy * 20, np.round(noisy * 20), atol=1e-4)  # whole photon counts


def test_acquisition_jitter_is_off_unless_asked():
    assert not any(isinstance(t, AcquisitionJitter) for t in build_train_transforms().transforms)
    steps = build_train_transforms(acquisition_p=0.3).transforms
    jitter = [t for t in steps if isinstance(t, AcquisitionJitter)]
    assert len(jitter) == 1 and jitter[0].p == 0.3
    assert isinstance(steps[-1], IntensityJitter)  # the optics and photons come before the camera's gain


def test_transforms_are_deterministic_under_a_seed():
    image, target = _sample()
    outputs = []
    for seed in (5, 5, 6):
        t = build_train_transforms(crop_size=40, scale_range=(0.8, 1.25), invert_p=0.5)
        rng = np.random.default_rng(seed)
        outputs.append([t(image, target, rng) for _ in range(4)])
    for (i1, t1), (i2, t2) in zip(outputs[0], outputs[1], strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(t1["masks"], t2["masks"])
        np.testing.assert_array_equal(t1["boxes"], t2["boxes"])
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(outputs[0], outputs[2], strict=True))
    # the seed given at construction is used when no generator is passed
    a = build_train_transforms(crop_size=40, seed=3)(image, target)[0]
    b = build_train_transforms(crop_size=40, seed=3)(image, target)[0]
    np.testing.assert_array_equal(a, b)
