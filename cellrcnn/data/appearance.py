"""What an image looks like, from its raw pixels alone: the acquisition group (size, colour,
background polarity) used for balanced sampling, and the imaging modality used to break
results down and to choose a model per image.

Light on purpose (numpy only): the data module, the evaluation tables and prediction use it.
"""

from __future__ import annotations

import numpy as np

MODALITIES = ("fluorescence", "brightfield", "H&E")
APPEARANCE_SAMPLES = 1 << 22


def appearance_key(raw: np.ndarray) -> tuple[int, int, bool, bool]:
    """(height, width, colour, bright background) of raw pixels: a proxy for the acquisition
    protocol. Colour means the first and last channels differ (a stain, not grey stored as RGB);
    a bright background means the median is above half the maximum (brightfield, H&E)."""
    from cellrcnn.io import strided_sample

    raw = np.asarray(raw)
    sample = strided_sample(raw, APPEARANCE_SAMPLES)  # every pixel up to about 2000 × 2000
    rgb = sample[..., :3].astype(np.float32) if raw.ndim == 3 else sample.astype(np.float32)
    colour = rgb.ndim == 3 and rgb.shape[-1] >= 3 and float(np.abs(rgb[..., 0] - rgb[..., 2]).mean()) > 2.0
    grey = rgb.mean(axis=-1) if rgb.ndim == 3 else rgb
    bright = float(np.median(grey)) > 0.5 * float(grey.max())
    return int(raw.shape[0]), int(raw.shape[1]), bool(colour), bool(bright)


def modality(raw: np.ndarray) -> str:
    """``"H&E"`` (a colour stain), ``"brightfield"`` (grey, bright background) or ``"fluorescence"``
    (bright nuclei on a dark background, grey or colour), read from the pixels.

    Colour on a dark background is fluorescence saved as RGB (DAPI in blue, a composite with a
    second marker), not a stain: stained tissue has a bright background even where it is dense
    (:func:`cellrcnn.io.is_stained_tissue`; every colour image of DSB2018 and MoNuSeg passes it)."""
    from cellrcnn.io import is_stained_tissue

    _, _, colour, bright = appearance_key(raw)
    if colour:
        return "H&E" if bright or is_stained_tissue(raw) else "fluorescence"
    return "brightfield" if bright else "fluorescence"
