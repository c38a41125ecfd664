"""Which shipped model suits an image, and when a result should not be trusted.

**Model choice** (``model=auto``): the image's appearance decides. A colour stain (H&E and
similar) goes to the model trained with stained tissue (``nuclei_he``) when it is installed;
everything else (fluorescence, grey brightfield) to the default ``nuclei``. The reason is
recorded with each result.

**Out-of-distribution warning**: a model knows what it was trained on, its *training profile*
(recorded in checkpoints by ``train.py``, or in a shipped model's card): how many training images
of each modality it saw and the spread of nucleus diameters as it saw them. An image is flagged
when its modality was rare in training, when the objects found are far larger or
smaller than any it trained on, or when the image holds almost no signal. A flagged image's
count should be checked by eye; neither Cellpose nor StarDist says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from cellrcnn.data.appearance import modality

DEFAULT_MODEL = "nuclei"
STAINED_MODEL = "nuclei_he"
# a modality counts as known when at least this share of the training images had it. The shipped
# models trained on 13 grey brightfield fields of 530-553 (2.5 %): on held-out DSB2018 brightfield
# fields they find 66 % of the nuclei (IoU 0.5) against 88 % for fluorescence (bench/results/
# generalist/nuclei_dsb_modalities/, the shipped nuclei), and on two crowded
# cytology fields they counted 37 % and 70 % of the annotated nuclei, so such images are flagged
MIN_MODALITY_SHARE = 0.05
# objects this much beyond the training diameters' 1st-99th percentiles are out of range
SIZE_MARGIN = 1.5
# fewer objects than this give no reliable median size
MIN_OBJECTS_FOR_SIZE = 5
# a percentile spread (99.8th - 1st) below this share of the dtype range is "almost no signal"
MIN_SIGNAL = 0.01
# an image narrower than this (px, as the model sees it) holds no whole nucleus, without a training profile
MIN_SIDE = 16


def choose_model(raw: np.ndarray, available: Iterable[str], polarity: str = "auto") -> tuple[str, str]:
    """``(model name, reason)`` for one raw image among the ``available`` shipped models;
    ``polarity="bright"`` (the user says the objects are bright) rules out stained tissue."""
    names = list(available)
    if not names:
        raise ValueError("no shipped model is installed (cellrcnn/weights/*.ckpt); give ckpt_path=")
    kind = modality(raw)
    if kind == "H&E" and polarity == "bright":
        return default_model(names), "colour image with bright objects (polarity=bright)"
    if kind == "H&E" and STAINED_MODEL in names:
        # its training data (MoNuSeg) is CC BY-NC-SA: say so wherever the choice is recorded
        return STAINED_MODEL, ("colour-stained image (H&E-like); nuclei_he's weights are for non-commercial "
                               "use (trained on CC BY-NC-SA 4.0 data): model=nuclei for commercial work")
    return default_model(names), f"{kind} image"


def default_model(available: Iterable[str]) -> str:
    """The model for images that are not colour-stained: ``nuclei`` when installed."""
    names = list(available)
    return DEFAULT_MODEL if DEFAULT_MODEL in names else names[0]


def training_profile(modalities: Iterable[str], diameters: Iterable[float]) -> dict:
    """What a model trained on: image count per modality and nucleus diameter percentiles (px,
    as the network saw them), for :func:`ood_reasons`."""
    counts: dict[str, int] = {}
    for kind in modalities:
        counts[kind] = counts.get(kind, 0) + 1
    d = np.asarray([v for v in diameters if np.isfinite(v)], float)
    sizes = {}
    if d.size:
        sizes = {f"p{q}": round(float(np.percentile(d, q)), 2) for q in (1, 5, 50, 95, 99)}
    return {"modalities": dict(sorted(counts.items())), "object_diameter_px": sizes}


def signal_range(raw: np.ndarray) -> float:
    """The 1st-99.8th percentile spread of the pixels as a share of the range their values use
    (1 for floats with any spread).

    An integer image's range is that of the bits it fills (at least 8): a 12-bit camera's field
    stored as 16-bit, or a dim 16-bit field with values 100-400, is judged against 4095 or 511,
    not 65535; a flat or black image has no spread at all."""
    raw = np.asarray(raw)
    sample = raw[:: max(1, raw.shape[0] // 512), :: max(1, raw.shape[1] // 512)]  # before any float copy
    grey = sample[..., :3].mean(axis=-1) if raw.ndim == 3 else sample
    lo, hi = np.percentile(grey, (1, 99.8))
    if raw.dtype.kind in "ui":
        top = max(float(np.max(sample)), 255.0)
        return float(hi - lo) / (2.0 ** np.ceil(np.log2(top + 1)) - 1)
    return 1.0 if hi > lo else 0.0


def ood_reasons(
    raw: np.ndarray, profile: Mapping | None, measured_diameter: float | None, factor: float = 1.0
) -> list[str]:
    """Why a result on ``raw`` should not be trusted ([] when nothing is off).

    Args:
        raw: the image as read.
        profile: the model's :func:`training_profile` (None or {}: only the signal is checked).
        measured_diameter: median diameter (px, in the image) of the objects found; None if too few.
        factor: the resize applied before the network saw the image (``diameter=``).
    """
    reasons = []
    if signal_range(raw) < MIN_SIGNAL:
        reasons.append("almost no signal (the brightest pixels are barely above the darkest)")
    h, w = np.shape(raw)[:2]
    smallest = ((profile or {}).get("object_diameter_px") or {}).get("p50") or MIN_SIDE
    if min(h, w) * factor < smallest:  # no whole nucleus of the size the model knows fits in it
        reasons.append(f"the image is only {w}×{h} px, too narrow for a whole nucleus of the size the model "
                       f"knows ({smallest:.0f} px): crop less tightly, or set diameter=<their diameter in px>")
    if not profile:
        return reasons
    counts = profile.get("modalities") or {}
    total = sum(counts.values())
    kind = modality(raw)
    if total and counts.get(kind, 0) / total < MIN_MODALITY_SHARE:
        seen = ", ".join(f"{k} {v}" for k, v in counts.items())
        reasons.append(f"{kind} images are rare in the model's training data ({seen} images): look at the "
                       "overlay before trusting the count")
    sizes = profile.get("object_diameter_px") or {}
    if measured_diameter and sizes.get("p1") and sizes.get("p99"):
        seen_at = float(measured_diameter) * factor
        if not sizes["p1"] / SIZE_MARGIN <= seen_at <= sizes["p99"] * SIZE_MARGIN:
            resized = f" (the model saw them at {seen_at:.0f} px, resized {factor:g}x)" if factor != 1 else ""
            reasons.append(
                f"objects of {measured_diameter:.0f} px median diameter{resized}, outside the training range "
                f"({sizes['p1']:.0f}-{sizes['p99']:.0f} px): set diameter=<their diameter in px> or diameter=auto"
            )
    return reasons
