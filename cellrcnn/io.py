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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")


class ImageReadError(ValueError):
    """An image or label file could not be read; the message names the file."""


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        data = page.asarray()
        # WhiteIsZero bilevel files (BBBC009 outlines) are returned as stored bits;
        # keep them as stored, callers that care decide the polarity.
        if data.ndim == 3 and data.shape[0] in (2, 3, 4) and data.shape[-1] not in (3, 4):
            data = np.moveaxis(data, 0, -1)  # planar CYX -> YXC
        return data


def _read_with_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV"):
            im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
        if im.mode == "1":
            return np.asarray(im, dtype=bool)
        if im.mode == "I;16B":
            im = im.convert("I;16")
        return np.asarray(im)


def read_image(path: str | Path) -> np.ndarray:
    """Raw pixels of an image file: H×W or H×W×C (C = 3 after dropping alpha).

    Raises ImageReadError for missing, unreadable or empty files.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            data = _read_tiff(path)
        elif path.suffix.lower() == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            data = _read_with_pil(path)
    except ImageReadError:
        raise
    except Exception as exc:  # every library raises its own type; report them all the same way
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    data = np.squeeze(data) if data.ndim > 2 and 1 in data.shape[:-1] else data
    if data.ndim == 3 and data.shape[-1] == 4:
        data = data[..., :3]  # alpha carries no signal in microscopy exports
    elif data.ndim == 3 and data.shape[-1] == 2:
        data = data[..., :1].squeeze(-1)  # grey + alpha
    elif data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3) or data.size == 0 or min(data.shape[:2]) == 0:
        raise ImageReadError(f"{path}: expected a 2-D image (H×W or H×W×C), got shape {data.shape}")
    if data.ndim == 3 and data.shape[-1] > 4:
        raise ImageReadError(
            f"{path}: {data.shape[-1]} channels or planes; pick a channel or z-plane first (shape {data.shape})"
        )
    return data


def normalize_percentile(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Scale an image to roughly [0, 1] by its own low/high percentiles (over all channels).

    Per-image percentiles make 8-bit, 12-bit-in-16 and float images look alike to a model,
    and a single pair over all channels keeps the colour balance of stained tissue.
    """
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [low, high])
    if hi - lo < 1e-6:  # flat image (blank field): keep it flat rather than amplify noise
        hi = lo + max(1.0, abs(lo))
    return (image - lo) / (hi - lo)


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


def load_image(path: str | Path, channels: int = 3, invert_bright: bool = False) -> np.ndarray:
    """Model input from a file: float32 C×H×W, percentile-normalised (see :func:`prepare_image`)."""
    raw = read_image(path)
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    return prepare_image(raw, channels, invert_bright)


def bright_background(image: np.ndarray) -> bool:
    """Whether a percentile-normalised image shows dark objects on a bright background
    (brightfield, H&E): its median, i.e. the background of any image that objects cover less
    than half of, lies in the upper half of its intensity range."""
    return float(np.median(image)) > 0.5


def prepare_image(raw: np.ndarray, channels: int = 3, invert_bright: bool = False) -> np.ndarray:
    """Raw H×W(×C) pixels -> float32 C×H×W normalised model input.

    ``invert_bright``: an image with a bright background becomes ``1 - image``, so every
    modality reaches the model as bright objects on a dark background. Decided on the whole
    image (a training crop or a tile could be mostly object).
    """
    image = normalize_percentile(to_channels(np.asarray(raw), channels))
    if invert_bright and bright_background(image):
        image = 1.0 - image
    return np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)


def image_files(folder: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files in a folder, sorted by name, hidden and macOS resource files skipped."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def read_label_image(path: str | Path) -> np.ndarray:
    """A label image (TIFF, PNG, NPY or a Cellpose ``_seg.npy``) as a 2-D int64 array."""
    path = Path(path)
    if path.name.endswith("_seg.npy"):
        try:
            data = np.load(path, allow_pickle=True).item()["masks"]
        except Exception as exc:
            raise ImageReadError(f"{path}: not a Cellpose _seg.npy file ({exc})") from exc
    else:
        data = read_image(path)
    data = np.asarray(data)
    if data.ndim == 3:
        # RGB-stored labels with equal channels are common exports; anything else is ambiguous.
        if all(np.array_equal(data[..., 0], data[..., c]) for c in range(1, data.shape[-1])):
            data = data[..., 0]
        else:
            raise ImageReadError(f"{path}: a label image must be 2-D integer, got shape {data.shape}")
    if data.dtype.kind == "f":
        if not np.all(np.mod(data, 1) == 0):
            raise ImageReadError(f"{path}: label image holds non-integer values")
    elif data.dtype.kind not in "iub":
        raise ImageReadError(f"{path}: label image has unsupported dtype {data.dtype}")
    if data.min() < 0:
        raise ImageReadError(f"{path}: label image holds negative values")
    return data.astype(np.int64)


def label_dtype(max_label: int) -> np.dtype:
    """uint16 while labels fit, uint32 above 65,535 objects."""
    return np.dtype(np.uint16) if max_label <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def write_label_image(path: str | Path, labels: np.ndarray) -> Path:
    """Write a 2-D label image as a compressed TIFF (uint16, or uint32 above 65,535 objects)."""
    import tifffile

    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{path}: a label image must be 2-D, got shape {labels.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    top = int(labels.max()) if labels.size else 0
    tifffile.imwrite(path, labels.astype(label_dtype(top)), compression="zlib")
    return path
