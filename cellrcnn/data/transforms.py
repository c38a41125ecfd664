"""Paired image/target transforms for instance segmentation (numpy in, numpy out).

Every transform is ``t(image, target, rng=None) -> (image, target)`` where ``image`` is
float32 C×H×W and ``target`` a dict of numpy arrays: ``boxes`` float32 N×4 xyxy (pixels,
x2/y2 exclusive), ``labels`` int64 N, ``masks`` uint8 N×H×W, ``has_mask`` bool N, ``image_id``.

Randomness: pass a ``numpy.random.Generator`` as ``rng`` (``Compose`` hands its own down
to every member, so one generator per sample fixes the whole chain); without one a
transform uses a generator built from its ``seed`` argument at construction. The data
module gives each training sample its own generator (see ``datamodule.py``).

Boxes of instances with masks are recomputed from the masks after every geometric change
(so the box is always the mask's tight box); box-only instances have their boxes moved
and clipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from cellrcnn.data.masks import masks_to_boxes_xyxy


class Transform:
    """Base class: holds the fallback generator used when ``__call__`` gets no ``rng``."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def _rng(self, rng: np.random.Generator | None) -> np.random.Generator:
        return self.rng if rng is None else rng

    def __call__(self, image: np.ndarray, target: dict, rng: np.random.Generator | None = None):
        raise NotImplementedError


def _with(target: dict, **changes) -> dict:
    out = dict(target)
    out.update(changes)
    return out


def _refresh_boxes(
    target: dict, boxes: np.ndarray, masks: np.ndarray, keep: np.ndarray | None = None
) -> dict:
    """New target with ``masks``; mask-derived boxes for has_mask rows, ``boxes`` for the rest."""
    has_mask = target["has_mask"]
    boxes = boxes.astype(np.float32).copy()
    if has_mask.any():
        boxes[has_mask] = masks_to_boxes_xyxy(masks[has_mask])
    out = _with(target, boxes=boxes, masks=masks)
    if keep is not None:
        for key in ("boxes", "labels", "masks", "has_mask"):
            out[key] = out[key][keep]
    return out


class Compose(Transform):
    """Apply transforms in order, sharing one generator."""

    def __init__(self, transforms: Sequence[Transform], seed: int | None = None) -> None:
        super().__init__(seed)
        self.transforms = list(transforms)

    def __call__(self, image, target, rng=None):
        rng = self._rng(rng)
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target


class RandomCrop(Transform):
    """Crop a random ``size``×``size`` (or (h, w)) window; pad images smaller than it.

    Padding uses zeros (``pad_mode="constant"``) or mirrors the image (``"reflect"``; the
    mirrored objects are unlabelled, so prefer zeros for training). An instance cut by the
    window to fewer than ``min_area`` pixels (box area for box-only ones) is dropped;
    whole small instances are kept.
    """

    def __init__(
        self, size: int | tuple[int, int], min_area: int = 10, pad_mode: str = "constant", seed=None
    ):
        super().__init__(seed)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
        self.min_area = min_area
        self.pad_mode = pad_mode

    def __call__(self, image, target, rng=None):
        rng = self._rng(rng)
        th, tw = self.size
        _, h, w = image.shape
        masks, boxes = target["masks"], target["boxes"].astype(np.float32)
        # pad first (random placement), then crop: both steps are plain offsets
        ph, pw = max(0, th - h), max(0, tw - w)
        if ph or pw:
            top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
            pad = ((top, ph - top), (left, pw - left))
            mode = self.pad_mode if min(h, w) > 1 else "constant"
            image = np.pad(image, ((0, 0), *pad), mode=mode)
            masks = np.pad(masks, ((0, 0), *pad))
            boxes = boxes + np.array([left, top, left, top], np.float32)
            h, w = h + ph, w + pw
        y0, x0 = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
        area_before = _areas(masks, boxes, target["has_mask"])
        image = image[:, y0 : y0 + th, x0 : x0 + tw]
        masks = masks[:, y0 : y0 + th, x0 : x0 + tw]
        boxes = boxes - np.array([x0, y0, x0, y0], np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, tw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, th)
        area_after = _areas(masks, boxes, target["has_mask"])
        keep = (area_after > 0) & ((area_after >= self.min_area) | (area_after >= area_before))
        return np.ascontiguousarray(image), _refresh_boxes(target, boxes, np.ascontiguousarray(masks), keep)


class CropAtMost(RandomCrop):
    """Random window of at most ``size`` per side, never padded (a cheap pre-crop before rescaling)."""

    def __call__(self, image, target, rng=None):
        (th, tw), (_, h, w) = self.size, image.shape
        if h <= th and w <= tw:
            return image, target
        return RandomCrop((min(th, h), min(tw, w)), min_area=1)(image, target, self._rng(rng))


def _areas(masks: np.ndarray, boxes: np.ndarray, has_mask: np.ndarray) -> np.ndarray:
    """Pixel count for mask instances, box area for box-only ones."""
    box_area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    mask_area = np.count_nonzero(masks, axis=(1, 2)) if len(masks) else box_area
    return np.where(has_mask, mask_area, box_area)


class RandomFlip(Transform):
    """Flip left-right and/or up-down, each with probability ``p``."""

    def __init__(self, horizontal: bool = True, vertical: bool = True, p: float = 0.5, seed=None):
        super().__init__(seed)
        self.horizontal, self.vertical, self.p = horizontal, vertical, p

    def __call__(self, image, target, rng=None):
        rng = self._rng(rng)
        # draw both decisions every time so the stream does not depend on the flags
        do_h, do_v = rng.random() < self.p, rng.random() < self.p
        _, h, w = image.shape
        boxes, masks = target["boxes"].astype(np.float32).copy(), target["masks"]
        if self.horizontal and do_h:
            image, masks = image[:, :, ::-1], masks[:, :, ::-1]
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        if self.vertical and do_v:
            image, masks = image[:, ::-1, :], masks[:, ::-1, :]
            boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
        return np.ascontiguousarray(image), _with(target, boxes=boxes, masks=np.ascontiguousarray(masks))


class RandomRot90(Transform):
    """Rotate by k·90° (k uniform in 0..3); non-square images swap H and W."""

    def __call__(self, image, target, rng=None):
        k = int(self._rng(rng).integers(0, 4))
        boxes = target["boxes"].astype(np.float32).copy()
        _, h, w = image.shape
        for _ in range(k):  # one counter-clockwise quarter turn: (row, col) -> (W-1-col, row)
            boxes = np.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], axis=1)
            h, w = w, h
        image = np.rot90(image, k, axes=(1, 2))
        masks = np.rot90(target["masks"], k, axes=(1, 2))
        return np.ascontiguousarray(image), _with(
            target, boxes=boxes.reshape(-1, 4).astype(np.float32), masks=np.ascontiguousarray(masks)
        )


class RandomScale(Transform):
    """Resize by a factor drawn log-uniformly from ``scale_range`` (image bilinear, masks nearest).

    Instances that vanish (fewer than ``min_area`` pixels) are dropped.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.75, 1.33), min_area: int = 4, seed=None):
        super().__init__(seed)
        self.scale_range, self.min_area = scale_range, min_area

    def __call__(self, image, target, rng=None):
        lo, hi = np.log(self.scale_range[0]), np.log(self.scale_range[1])
        s = float(np.exp(self._rng(rng).uniform(lo, hi)))
        _, h, w = image.shape
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) == (h, w):
            return image, target
        resized = cv2.resize(np.moveaxis(image, 0, -1), (nw, nh), interpolation=cv2.INTER_LINEAR)
        image = np.moveaxis(resized.reshape(nh, nw, -1), -1, 0).astype(np.float32)
        # nearest neighbour by index maps: exact labels and any number of instances
        rows = np.minimum((np.arange(nh) + 0.5) * h / nh, h - 1).astype(np.intp)
        cols = np.minimum((np.arange(nw) + 0.5) * w / nw, w - 1).astype(np.intp)
        masks = target["masks"][:, rows[:, None], cols[None, :]]
        boxes = target["boxes"].astype(np.float32) * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
        area = _areas(masks, boxes, target["has_mask"])
        return np.ascontiguousarray(image), _refresh_boxes(target, boxes, masks, area >= self.min_area)


class IntensityJitter(Transform):
    """Random gamma, gain, offset and Gaussian noise on a roughly [0, 1] image; optional inversion.

    Inversion (``1 - x``, probability ``invert_p``) turns dark-on-bright (brightfield, H&E)
    into bright-on-dark and back, which helps a model trained on one modality meet the other.
    Applied with probability ``p``; geometry is untouched.
    """

    def __init__(
        self,
        p: float = 0.8,
        gamma: tuple[float, float] = (0.7, 1.4),
        gain: tuple[float, float] = (0.8, 1.25),
        offset: tuple[float, float] = (-0.1, 0.1),
        noise_std: tuple[float, float] = (0.0, 0.03),
        invert_p: float = 0.0,
        seed=None,
    ):
        super().__init__(seed)
        self.p, self.gamma, self.gain, self.offset = p, gamma, gain, offset
        self.noise_std, self.invert_p = noise_std, invert_p

    def __call__(self, image, target, rng=None):
        rng = self._rng(rng)
        apply, invert = rng.random() < self.p, rng.random() < self.invert_p
        g = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))
        gain, offset = float(rng.uniform(*self.gain)), float(rng.uniform(*self.offset))
        std = float(rng.uniform(*self.noise_std))
        seed = int(rng.integers(0, 2**63 - 1))
        image = image.astype(np.float32, copy=True)
        if invert:
            image = 1.0 - image
        if apply:
            image = np.clip(image, 0.0, None) ** g * gain + offset  # gamma needs non-negative values
            if std > 0:
                image += np.random.default_rng(seed).normal(0.0, std, image.shape).astype(np.float32)
        return image.astype(np.float32), target


class AcquisitionJitter(Transform):
    """Defocus and photon shot noise, as another microscope or a dimmer exposure would record the
    same field, on a roughly [0, 1] image (before :class:`IntensityJitter`, as in a camera: the
    optics blur, photons arrive, then gain and offset).

    With probability ``p`` a sample gets each of: a Gaussian blur of sigma drawn from
    ``blur_sigma`` (pixels; probability ``blur_p``) and Poisson noise at a brightest-pixel count
    drawn log-uniformly from ``photons`` (probability ``noise_p``). Held-out DSB2018 images
    blurred by sigma 1.5 or recorded at 30 photons lose a quarter of their dsb_score with a model
    trained without them (``bench/robustness.py``). Geometry is untouched.
    """

    def __init__(self, p: float = 0.3, blur_sigma: tuple[float, float] = (0.5, 2.0), blur_p: float = 0.5,
                 photons: tuple[float, float] = (10.0, 300.0), noise_p: float = 0.5, seed=None):
        super().__init__(seed)
        self.p, self.blur_sigma, self.blur_p = p, blur_sigma, blur_p
        self.photons, self.noise_p = photons, noise_p

    def __call__(self, image, target, rng=None):
        from scipy import ndimage

        rng = self._rng(rng)
        if rng.random() >= self.p:
            return image, target
        blur, noise = rng.random() < self.blur_p, rng.random() < self.noise_p
        sigma = float(rng.uniform(*self.blur_sigma))
        photons = float(np.exp(rng.uniform(np.log(self.photons[0]), np.log(self.photons[1]))))
        image = image.astype(np.float32, copy=True)
        if blur:  # C×H×W: channels are not blurred into each other
            image = ndimage.gaussian_filter(image, (0.0,) * (image.ndim - 2) + (sigma, sigma))
        if noise:
            image = rng.poisson(np.clip(image, 0.0, None) * photons).astype(np.float32) / photons
        return image, target


def build_train_transforms(
    crop_size: int | None = 256,
    min_area: int = 10,
    flips: bool = True,
    rot90: bool = True,
    intensity: bool = True,
    invert_p: float = 0.0,
    scale_range: tuple[float, float] | None = None,
    pad_mode: str = "constant",
    acquisition_p: float = 0.0,
    seed: int | None = None,
) -> Compose:
    """Training augmentation: [scale] -> crop -> flips -> rot90 -> [defocus, shot noise] -> intensity.

    ``crop_size=None`` keeps full images; ``scale_range`` e.g. ``(0.75, 1.33)`` enables scaling;
    ``acquisition_p`` > 0 degrades that share of samples (:class:`AcquisitionJitter`).
    """
    steps: list[Transform] = []
    if scale_range is not None:
        if crop_size:  # pre-crop what the smallest scale can still use: rescaling a 1024² field's
            # full mask stack costs seconds per sample, the window's a few milliseconds
            steps.append(CropAtMost(int(np.ceil(crop_size / min(scale_range))) + 2))
        steps.append(RandomScale(tuple(scale_range)))
    if crop_size:
        steps.append(RandomCrop(crop_size, min_area=min_area, pad_mode=pad_mode))
    if flips:
        steps.append(RandomFlip())
    if rot90:
        steps.append(RandomRot90())
    if acquisition_p > 0:
        steps.append(AcquisitionJitter(p=acquisition_p))
    if intensity:
        steps.append(IntensityJitter(invert_p=invert_p))
    return Compose(steps, seed=seed)
