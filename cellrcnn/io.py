"""Reading and writing microscopy images and label images.

Every reader raises :class:`ImageReadError` naming the file and the problem, so a
corrupt file in a folder of thousands is found at once.

Contracts (see DESIGN.md):
- ``read_image`` returns the raw pixels, H×W or H×W×C, any dtype, alpha dropped.
- ``load_image`` returns the model input: float32 C×H×W, C = 1 or 3, normalised
  per image to the 1st–99.8th percentile, whatever the bit depth; with ``invert_bright`` an
  image with a bright background (brightfield, H&E) is inverted, so objects are always the
  bright ones, as in fluorescence.
- Label images are 2-D integer arrays, 0 = background, objects 1..N.

Hostile and careless input:
- Multi-page TIFFs (z-stacks, channels stored as pages) and images with channels that are not
  colour (a 2-channel TIFF, an ImageJ ``CYX`` composite) are never silently reduced to their
  first plane: ``channel=`` (which channel holds the nuclei) and ``plane=`` (which z-plane or
  page) choose, and without them such a file is an error naming the option to set. The TIFF
  ExtraSamples tag decides whether an extra sample is alpha (dropped) or a channel.
- One pixel limit for every format, :data:`MAX_IMAGE_PIXELS` (default 2**30, about a
  33,000 × 33,000 field; environment variable ``CELLRCNN_MAX_IMAGE_PIXELS`` or
  :func:`set_max_image_pixels` to raise it), replaces Pillow's decompression-bomb guard, which
  refused a 14,000 × 14,000 PNG that the same TIFF read fine.
- Non-finite pixels (NaN, ±inf) in float images are replaced (NaN by the median of the finite
  pixels, ±inf by their max/min) with a :class:`NonFiniteWarning` naming the file, so one bad
  pixel cannot turn the whole normalised input into NaN.
- Writers go through :func:`atomic_write` (temporary file in the same folder, then rename): an
  interrupted run leaves no half-written file, a symlink in the output folder is replaced rather
  than written through, and files declared with :func:`protect_inputs` are never replaced.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")


class ImageReadError(ValueError):
    """An image or label file could not be read; the message names the file."""


class NonFiniteWarning(UserWarning):
    """An image held NaN or infinite pixels, which were replaced; the message names the file."""


MAX_IMAGE_PIXELS = int(os.environ.get("CELLRCNN_MAX_IMAGE_PIXELS", 1 << 30))
NORMALISED_LIMIT = 1e4  # normalised model input is clipped to ±this (1 = the image's 99.8th percentile)


def set_max_image_pixels(limit: int) -> None:
    """Raise (or lower) the pixel limit of :func:`read_image` for every format (H × W × planes)."""
    global MAX_IMAGE_PIXELS
    MAX_IMAGE_PIXELS = int(limit)


def _check_pixels(path: Path, n_pixels: int, what: str) -> None:
    if n_pixels > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            f"{path}: {what} has {n_pixels:,} pixels, above the limit of {MAX_IMAGE_PIXELS:,} "
            "(raise it with CELLRCNN_MAX_IMAGE_PIXELS=N or cellrcnn.io.set_max_image_pixels(N))"
        )


_ALPHA_EXTRASAMPLES = (1, 2)  # TIFF ExtraSamples: 1 associated alpha, 2 unassociated alpha; 0 unspecified data


def _read_tiff(path: Path, channel: int | None) -> tuple[np.ndarray, str, bool]:
    """Pixels of the first series and what their last axis means: ``"grey"`` (Y×X), ``"colour"``
    (Y×X×3, alpha already dropped), or ``"pages"``/``"planes"``/``"channels"`` (N×Y×X: pages
    of unknown meaning, z-planes or time points, or channels that are not colour), decided from
    the series axes and the ExtraSamples tag; and
    whether ``channel`` was already applied (to the C axis of a stack with planes and channels)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        # pages written one at a time (tifffile's append=True, many acquisition scripts) are a
        # series each: the series shaped as the first are the file's pages, never its first alone
        alike = [s for s in tif.series if s.shape == series.shape and s.dtype == series.dtype]
        page = series.keyframe
        _check_pixels(path, int(np.prod(series.shape)) * len(alike),
                      f"the {series.axes} series {series.shape}" + (f" (×{len(alike)})" if len(alike) > 1 else ""))
        data = np.stack([s.asarray() for s in alike]) if len(alike) > 1 else series.asarray()
        axes = "Q" + series.axes if len(alike) > 1 else series.axes
        photometric = int(page.photometric)
        extras = tuple(int(e) for e in (page.extrasamples or ()))
    # WhiteIsZero bilevel files (BBBC009 outlines) are returned as stored bits;
    # keep them as stored, callers that care decide the polarity.
    if data.ndim != len(axes):
        raise ImageReadError(f"{path}: TIFF axes {axes!r} do not match its shape {data.shape}")
    keep = [i for i, a in enumerate(axes) if a in "YXS" or data.shape[i] > 1]  # drop size-1 planes
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    kind = "grey"
    if "S" in axes:
        data = np.moveaxis(data, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
        n_alpha = sum(e in _ALPHA_EXTRASAMPLES for e in extras)
        if n_alpha and data.shape[-1] - n_alpha >= 1:
            data = data[..., : data.shape[-1] - n_alpha]  # the ExtraSamples tag marks them as alpha
        extra = data[..., 3:]
        if photometric == 2 and extra.size and extra.min() != extra.max():
            # RGB plus varying samples the tag does not call alpha: channels of their own (the
            # nuclei may be in one), so all of them are offered to channel=K; a constant one is
            # an untagged alpha
            data, axes, kind = np.moveaxis(data, -1, 0), "C" + axes[:-1], "channels"
        elif photometric == 2 and data.shape[-1] >= 3:  # RGB
            data, axes, kind = data[..., :3], axes[:-1], "colour"
        elif data.shape[-1] == 1:
            data, axes = data[..., 0], axes[:-1]
        else:  # grey with unspecified extra samples: real channels
            data, axes, kind = np.moveaxis(data, -1, 0), "C" + axes[:-1], "channels"
    others = [a for a in axes if a not in "YX"]
    used = False
    if not others:
        return data, kind, used
    if "C" in others and (len(others) > 1 or kind == "colour"):  # e.g. an ImageJ ZCYX hyperstack
        c = others.index("C")
        if channel is None or not 0 <= channel < data.shape[c]:
            raise ImageReadError(
                f"{path}: a {''.join(others)}YX stack of shape {data.shape}; set channel=K "
                f"(0..{data.shape[c] - 1}, the nuclei channel) and plane=K"
            )
        data, others, used = np.take(data, channel, axis=c), [a for a in others if a != "C"], True
        kind = "grey" if kind == "channels" else kind
    if kind == "colour" or len(others) > 1:
        return data.reshape(-1, *data.shape[len(others):]), "planes", used
    if others[0] == "C" or kind == "channels":
        return data, "channels", used
    # pages of unknown meaning (tifffile's Q or I axis) may be channels, as channel=K can say;
    # z-planes or time points that the file names as such are planes
    return data, ("pages" if others[0] in "QI" else "planes"), used


# the first bytes of a TIFF and a BigTIFF, little- and big-endian
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff(path: Path) -> bool:
    """Whether the file starts as a TIFF or BigTIFF does; a PNG or JPEG renamed .tif (as some
    export tools do) is then read for what it is."""
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _read_with_pil(path: Path) -> np.ndarray:
    from PIL import Image

    # Pillow's decompression-bomb guard would refuse large PNGs that the same TIFF reads;
    # one limit for all formats (MAX_IMAGE_PIXELS) is checked from the header instead
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        _check_pixels(path, im.size[0] * im.size[1], f"the {im.size[0]}×{im.size[1]} (W×H) image")
        im.load()
        if im.mode == "LA":  # grey + alpha: PNG's alpha band is never a channel
            im = im.convert("L")
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "HSV"):
            im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
        if im.mode == "1":
            return np.asarray(im, dtype=bool)
        if im.mode == "I;16B":
            im = im.convert("I;16")
        data = np.asarray(im)
        return data[..., :3] if data.ndim == 3 and data.shape[-1] == 4 else data  # PIL's 4th band is alpha


def _pick(path: Path, data: np.ndarray, kind: str, channel: int | None, plane: int | None) -> np.ndarray:
    """Apply ``plane=`` / ``channel=`` to N×Y×X stacks and Y×X×C images; ambiguity is an error."""
    if kind == "pages" and channel is not None and plane is None and data.ndim == 3:
        kind = "channels"  # pages without metadata that the user says are channels
    if kind in ("planes", "pages"):
        n = data.shape[0]
        if plane is None:
            pages = kind == "pages"
            raise ImageReadError(
                f"{path}: {n} {'pages' if pages else 'z-planes or time points'} (shape {data.shape}); set "
                f"plane=K (0..{n - 1}) to choose one" + (", or channel=K if the pages are channels" if pages else "")
            )
        if not 0 <= plane < n:
            raise ImageReadError(f"{path}: plane={plane} but the file has {n} planes (0..{n - 1})")
        data, kind = data[plane], ("colour" if data.ndim == 4 else "grey")
        plane = None
    if plane not in (None, 0):
        raise ImageReadError(f"{path}: plane={plane} but the file has a single plane")
    if kind == "channels":
        n = data.shape[0]
        if channel is None:
            raise ImageReadError(
                f"{path}: {n} channels that are not colour (shape {data.shape}); set channel=K (0..{n - 1}) "
                "to say which channel holds the nuclei"
            )
        if not 0 <= channel < n:
            raise ImageReadError(f"{path}: channel={channel} but the file has {n} channels (0..{n - 1})")
        return data[channel]
    if channel is not None and data.ndim == 3:
        if not 0 <= channel < data.shape[-1]:
            raise ImageReadError(f"{path}: channel={channel} but the image has {data.shape[-1]} channels")
        return data[..., channel]
    if channel not in (None, 0):
        raise ImageReadError(f"{path}: channel={channel} but the image has a single channel")
    return data


def replace_non_finite(data: np.ndarray, name: str = "image") -> np.ndarray:
    """Float pixels with NaN/±inf replaced (NaN -> median, +inf -> max, -inf -> min of the finite
    pixels), with a :class:`NonFiniteWarning` naming ``name``; other arrays are returned as they are."""
    if data.dtype.kind not in "fc":
        return data
    finite = np.isfinite(data)
    if finite.all():
        return data
    if not finite.any():
        raise ImageReadError(f"{name}: every pixel is NaN or infinite")
    values = data[finite]
    data = np.array(data, copy=True)
    n_nan, n_pos = int(np.isnan(data).sum()), int(np.isposinf(data).sum())
    n_neg = int((~finite).sum()) - n_nan - n_pos
    data[np.isnan(data)] = np.median(values)
    data[np.isposinf(data)] = values.max()
    data[np.isneginf(data)] = values.min()
    warnings.warn(
        f"{name}: {n_nan + n_pos + n_neg:,} non-finite pixel(s) replaced ({n_nan} NaN -> median, "
        f"{n_pos} +inf -> max, {n_neg} -inf -> min of the finite pixels)",
        NonFiniteWarning,
        stacklevel=3,
    )
    return data


def read_image(path: str | Path, channel: int | None = None, plane: int | None = None) -> np.ndarray:
    """Raw pixels of an image file: H×W or H×W×3 (alpha dropped), non-finite pixels replaced.

    ``channel``: index of the channel to keep (the nuclei channel of a multi-channel file, or one
    colour of an RGB image) -> H×W. ``plane``: index of the z-plane / page of a multi-page TIFF.
    A multi-page or multi-channel file that is not colour needs them (error otherwise).
    Raises ImageReadError, naming the file, for missing, unreadable, empty, too large or
    ambiguous files.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:  # an interrupted copy or download: say so, not "cannot identify"
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    kind = "grey"
    try:
        if path.suffix.lower() in (".tif", ".tiff") and _is_tiff(path):
            data, kind, used = _read_tiff(path, channel)
            channel = None if used else channel
        elif path.suffix.lower() == ".npy":
            data = np.load(path, allow_pickle=False, mmap_mode="r")
            _check_pixels(path, int(data.size), f"the array of shape {data.shape}")
            data = np.asarray(data)
        else:
            data = _read_with_pil(path)
    except ImageReadError:
        raise
    except Exception as exc:  # every library raises its own type; report them all the same way
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if kind == "grey":
        data = np.squeeze(data) if data.ndim > 2 and 1 in data.shape[:-1] else data
        if data.ndim == 3 and data.shape[-1] == 1:
            data = data[..., 0]
        elif data.ndim == 3 and data.shape[-1] == 4 and channel is None:
            data = data[..., :3]  # an RGBA array: alpha carries no signal in microscopy exports
        elif data.ndim == 3 and data.shape[-1] != 3 and channel is None:
            raise ImageReadError(
                f"{path}: {data.shape[-1]} channels or planes (shape {data.shape}); set channel=K to say "
                "which channel holds the nuclei"
            )
    data = _pick(path, data, kind, channel, plane)
    if data.ndim not in (2, 3) or data.size == 0 or min(data.shape[:2]) == 0:
        raise ImageReadError(f"{path}: expected a 2-D image (H×W or H×W×C), got shape {data.shape}")
    return replace_non_finite(data, str(path))


def normalize_percentile(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Scale an image to roughly [0, 1] by its own low/high percentiles (over all channels).

    Per-image percentiles make 8-bit, 12-bit-in-16 and float images look alike to a model,
    and a single pair over all channels keeps the colour balance of stained tissue.
    """
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [low, high])
    if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN/inf pixels: ignore them, then replace them
        image = replace_non_finite(image, "image")
        lo, hi = np.percentile(image, [low, high])
    if hi - lo < 1e-6:  # flat image (blank field): keep it flat rather than amplify noise
        hi = lo + max(1.0, abs(lo))
    out = (image - lo) / (hi - lo)
    # a stray 1e30 pixel is finite but overflows the network's normalisation layers: bounded here
    return np.clip(out, -NORMALISED_LIMIT, NORMALISED_LIMIT, out=out)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """H×W or H×W×3 -> H×W×channels (1 or 3): grey is repeated, colour averaged."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    return image.mean(axis=-1, keepdims=True)


def load_image(path: str | Path, channels: int = 3, invert_bright: bool = False,
               hematoxylin: bool = False) -> np.ndarray:
    """Model input from a file: float32 C×H×W, percentile-normalised (see :func:`prepare_image`)."""
    raw = read_image(path)
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    return prepare_image(raw, channels, invert_bright, hematoxylin)


# Colour-stained tissue (H&E, IHC) has dark nuclei however densely it fills the field: its
# background is bright even where it covers less than half of the image. Measured on MoNuSeg's
# 40x fields, whose median normalised grey lies between 0.24 and 0.72 (half of them below 0.5),
# while colour fluorescence composites and grey fluorescence have medians below about 0.1.
STAINED_MIN_MEDIAN = 0.2


def is_stained(image: np.ndarray, channel_axis: int = -1) -> bool:
    """Whether an image is colour-stained (H&E, IHC): its first and last colour channels differ
    by more than 1 % of its intensity range on average (grey stored as RGB does not)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[channel_axis] < 3:
        return False
    first = np.take(image, 0, axis=channel_axis).astype(np.float32)
    last = np.take(image, 2, axis=channel_axis).astype(np.float32)
    finite = np.isfinite(first) & np.isfinite(last)
    if not finite.any():
        return False
    span = float(max(first[finite].max(), last[finite].max()) - min(first[finite].min(), last[finite].min()))
    return span > 0 and float(np.abs(first - last)[finite].mean()) > 0.01 * span


def bright_background(image: np.ndarray, stained: bool = False) -> bool:
    """Whether a percentile-normalised image shows dark objects on a bright background
    (brightfield, H&E): its median, i.e. the background of any image that objects cover less
    than half of, lies in the upper half of its intensity range, and so does its most common
    grey level (:func:`background_level`); or, for a colour-stained image (``stained``,
    :func:`is_stained` of the raw pixels), its median lies above :data:`STAINED_MIN_MEDIAN`.

    The second condition keeps dense fluorescence fields (nuclei over more than half of the
    field, so a bright median) as they are: their dark background is still the commonest level.
    On 3,189 random crops of DSB2018 and S-BSST265 grey images the median alone inverted 14
    fluorescence crops (nuclei over 58-94 % of them), both conditions 5 (over 77-94 %); on the
    693 whole annotated images of DSB2018, S-BSST265 and MoNuSeg both rules decide alike and
    right. Denser fields need ``polarity=bright`` (:func:`input_polarity`).
    """
    image = np.asarray(image)
    median = float(np.median(image))
    if stained:
        return median > STAINED_MIN_MEDIAN
    return median > 0.5 and background_level(image) > 0.5


def background_level(image: np.ndarray, bins: int = 64) -> float:
    """The commonest grey level of a percentile-normalised image (centre of the tallest bin of a
    lightly smoothed histogram over [0, 1]): an even background outnumbers any single level of
    textured objects."""
    counts, edges = np.histogram(np.clip(image, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    counts = np.convolve(counts, np.ones(3) / 3, mode="same")
    top = int(np.argmax(counts))
    return float(edges[top] + edges[top + 1]) / 2


POLARITIES = ("auto", "bright", "dark")


def check_polarity(polarity: str) -> str:
    """``polarity`` when it is one of :data:`POLARITIES`, else a ValueError saying what each means."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity={polarity!r}: use auto (decided per image), bright (objects brighter than "
                         "the background: fluorescence) or dark (darker: brightfield, stained tissue)")
    return polarity


def as_hematoxylin(raw: np.ndarray, hematoxylin: bool, polarity: str = "auto") -> bool:
    """Whether a model that reads stained tissue as hematoxylin density (``hematoxylin``) gets
    these raw pixels so: colour-stained tissue (:func:`is_stained_tissue`), unless the user said
    the objects are bright (``polarity``)."""
    return hematoxylin and check_polarity(polarity) != "bright" and is_stained_tissue(raw)


def inverts(normalised: np.ndarray, raw: np.ndarray, invert_bright: bool, polarity: str = "auto") -> bool:
    """Whether a model that trained on inverted bright-background images (``invert_bright``) gets
    this one inverted: ``polarity`` ``dark`` (the user says the objects are darker than the
    background) always, ``bright`` never, ``auto`` when the percentile-``normalised`` image has a
    :func:`bright_background` (judged as colour-stained when ``raw`` is)."""
    if not invert_bright or check_polarity(polarity) == "bright":
        return False
    return polarity == "dark" or bright_background(normalised, stained=is_stained(raw))


def input_polarity(raw: np.ndarray, invert_bright: bool, hematoxylin: bool = False, polarity: str = "auto",
                   max_samples: int = 1 << 22) -> str:
    """How :func:`prepare_image` presents raw pixels to a model: ``"hematoxylin"`` (stained tissue
    as its nuclear stain's density), ``"inverted"`` (dark objects on a bright background turned
    into bright ones) or ``"as is"``; a large image is judged from a subsample."""
    raw = np.asarray(raw)
    if as_hematoxylin(raw, hematoxylin, polarity):
        return "hematoxylin"
    sample = strided_sample(raw, max_samples)
    return "inverted" if inverts(normalize_percentile(to_channels(sample, 1)), sample, invert_bright, polarity) else "as is"


# Ruifrok & Johnston's stain vectors (rows: hematoxylin, eosin, DAB optical density per R, G, B;
# skimage.color.rgb_from_hed): colour deconvolution separates the nuclear stain from the rest
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HEMATOXYLIN_FROM_OD = np.linalg.inv(_RGB_FROM_HED)[:, 0].astype(np.float32)


def hematoxylin_density(rgb: np.ndarray, rows_per_chunk: int = 1024) -> np.ndarray:
    """H×W×3 colour-stained pixels (any dtype) -> H×W float32 optical density of the hematoxylin
    stain (colour deconvolution): nuclei bright, background and eosin-stained tissue dark.

    Mean grey makes pink cytoplasm almost as dark as purple nuclei; the hematoxylin density keeps
    the contrast that the stain was chosen for, whatever the lab's stain balance. Computed in row
    chunks, so a whole-slide field never needs a float copy of all three channels.
    """
    rgb = np.asarray(rgb)[..., :3]
    if rgb.dtype.kind in "ui":
        top, eps = float(np.iinfo(rgb.dtype).max), 1.0
    else:
        top = max(float(np.nanmax(rgb)), 1e-6)
        eps = top / 255.0  # the 8-bit offset, so a black pixel has a finite density
    out = np.empty(rgb.shape[:2], np.float32)
    for y in range(0, rgb.shape[0], rows_per_chunk):
        strip = rgb[y : y + rows_per_chunk].astype(np.float32)
        density = -np.log((strip + eps) / (top + eps))  # Beer-Lambert: optical density per channel
        np.maximum(density @ _HEMATOXYLIN_FROM_OD, 0.0, out=out[y : y + rows_per_chunk])
    return out


def strided_sample(raw: np.ndarray, max_samples: int) -> np.ndarray:
    """A strided view of H×W(×C) pixels with at most about ``max_samples`` pixels: statistics of a
    whole-slide field (appearance, stain) without a copy of it; every pixel of a small image."""
    step = max(1, int(np.ceil(np.sqrt(raw.shape[0] * raw.shape[1] / max_samples))))
    return raw[::step, ::step]


def is_stained_tissue(raw: np.ndarray, max_samples: int = 1 << 20) -> bool:
    """Whether raw H×W×C pixels show colour-stained tissue (H&E, IHC): colour (:func:`is_stained`)
    on a bright background (:func:`bright_background`), read from a strided subsample so that a
    whole-slide field costs a few MB. Colour fluorescence composites (dark background) are not."""
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[-1] < 3:
        return False
    sample = strided_sample(raw, max_samples)[..., :3]
    return is_stained(sample) and bright_background(normalize_percentile(to_channels(sample, 1)), stained=True)


def prepare_image(raw: np.ndarray, channels: int = 3, invert_bright: bool = False,
                  hematoxylin: bool = False, polarity: str = "auto") -> np.ndarray:
    """Raw H×W(×C) pixels -> float32 C×H×W normalised model input.

    ``invert_bright``: an image with a bright background becomes ``1 - image``, so every
    modality reaches the model as bright objects on a dark background. Decided on the whole
    image (a training crop or a tile could be mostly object).
    ``hematoxylin``: colour-stained tissue (:func:`is_stained_tissue`) becomes its hematoxylin
    density (:func:`hematoxylin_density`) instead, already bright nuclei on a dark background.
    ``polarity``: ``auto`` decides both from the image; ``bright`` or ``dark`` say what the objects
    are (:func:`inverts`, :func:`as_hematoxylin`).
    """
    raw = np.asarray(raw)
    if as_hematoxylin(raw, hematoxylin, polarity):
        image = normalize_percentile(to_channels(hematoxylin_density(raw), channels))
        return np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)
    image = normalize_percentile(to_channels(raw, channels))
    if inverts(image, raw, invert_bright, polarity):
        image = 1.0 - image
    return np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)


def as_hwc(image_raw, shape: tuple[int, int]) -> np.ndarray:
    """H×W, H×W×C or C×H×W raw image of an H×W ``shape`` -> H×W×C (a view, any dtype kept), or a
    clear error when it does not match the shape."""
    image = np.asarray(image_raw)
    if image.shape == shape:
        return image[..., None]
    if image.ndim == 3 and image.shape[:2] == shape:
        return image
    if image.ndim == 3 and image.shape[1:] == shape:
        return np.moveaxis(image, 0, -1)
    raise ValueError(f"image of shape {image.shape} does not match the label image of shape {shape}")


def image_files(folder: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files in a folder, sorted by name, hidden and macOS resource files skipped."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def read_label_image(path: str | Path, allow_pickle: bool = False, plane: int | None = None) -> np.ndarray:
    """A label image (TIFF, PNG, NPY or a Cellpose ``_seg.npy``) as a 2-D int64 array.

    ``_seg.npy`` files are pickled dictionaries, and unpickling runs code chosen by whoever wrote
    the file: they are read only with ``allow_pickle=True`` (for files you trust). ``plane``
    picks one plane of a label stack (a stack without it is an error, never plane 0 silently).
    Label values above the int64 range (uint64 ids >= 2**63) are renumbered 1..N in value order.
    """
    path = Path(path)
    if path.name.endswith("_seg.npy"):
        if not allow_pickle:
            raise ImageReadError(
                f"{path}: a Cellpose _seg.npy is a pickle, and loading one runs code from the file; "
                "pass allow_pickle=True (--allow-pickle) only for files you trust, or export the masks "
                "as a label TIFF/PNG"
            )
        try:
            data = np.load(path, allow_pickle=True).item()["masks"]
        except Exception as exc:
            raise ImageReadError(f"{path}: not a Cellpose _seg.npy file ({exc})") from exc
    else:
        data = read_image(path, plane=plane)
    data = np.asarray(data)
    if data.ndim == 3:
        # RGB-stored labels with equal channels are common exports; anything else is ambiguous.
        if all(np.array_equal(data[..., 0], data[..., c]) for c in range(1, data.shape[-1])):
            data = data[..., 0]
        else:
            raise ImageReadError(f"{path}: a label image must be 2-D integer, got shape {data.shape}")
    if data.ndim != 2:
        raise ImageReadError(f"{path}: a label image must be 2-D, got shape {data.shape}")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.all(np.mod(data, 1) == 0):
            raise ImageReadError(f"{path}: label image holds non-integer values")
    elif data.dtype.kind not in "iub":
        raise ImageReadError(f"{path}: label image has unsupported dtype {data.dtype}")
    if data.size and data.min() < 0:
        raise ImageReadError(f"{path}: label image holds negative values")
    if data.size and data.dtype.kind in "uf" and data.max() > np.iinfo(np.int64).max:
        # ids, not quantities: renumbering keeps every object apart where a cast would wrap negative
        ids, inverse = np.unique(data, return_inverse=True)
        data = inverse.reshape(data.shape) + (0 if ids[0] == 0 else 1)
    return data.astype(np.int64)


def label_dtype(max_label: int) -> np.dtype:
    """uint16 while labels fit, uint32 above 65,535 objects."""
    return np.dtype(np.uint16) if max_label <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


_PROTECTED = threading.local()


def _keys(path: str | Path) -> set[str]:
    """The names under which a file can be reached: its real path, and its folder's real path
    with its own name (a symlink's own entry)."""
    path = Path(path)
    return {os.path.realpath(path), os.path.join(os.path.realpath(path.parent), path.name)}


def protect_inputs(paths: Iterable[str | Path]) -> None:
    """Declare this thread's input files: :func:`atomic_write` refuses to replace them (by any
    name: symlinks and a folder reached twice included) until the next call."""
    _PROTECTED.keys = set().union(*(_keys(p) for p in paths))


def is_protected(path: str | Path) -> bool:
    """Whether writing ``path`` would replace a file declared with :func:`protect_inputs`."""
    keys = getattr(_PROTECTED, "keys", set())
    return bool(keys) and bool(_keys(path) & keys)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write a file through ``write(tmp_path)`` into a temporary file in the same folder, then
    rename it over ``path``: readers never see half a file, an interrupted run leaves the old
    file, and an existing symlink at ``path`` is replaced, never written through to its target.
    The temporary name keeps the suffix (writers that choose the format by it still work).
    Raises FileExistsError for a protected input (:func:`protect_inputs`)."""
    path = Path(path)
    if is_protected(path):
        raise FileExistsError(f"{path}: refusing to overwrite an input file; choose another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".part{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()  # some writers refuse an existing file (or append to it)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_label_image(path: str | Path, labels: np.ndarray) -> Path:
    """Write a 2-D label image as a compressed TIFF (uint16, or uint32 above 65,535 objects),
    atomically (:func:`atomic_write`)."""
    import tifffile

    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{path}: a label image must be 2-D, got shape {labels.shape}")
    top = int(labels.max()) if labels.size else 0
    data = labels.astype(label_dtype(top))
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib"))
