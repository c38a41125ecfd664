"""Outline drawings -> filled instances, shared by BBBC007, BBBC009, BBBC018 and CHO/BBBC030.

Rule (DATASETS.md §2–4, §10): the outline is the minority value of a two-valued file (either
polarity: WhiteIsZero 1-bit TIFFs read as stored bits, Pillow inverts them) or the non-zero
pixels of a multi-valued one. Instances are the 4-connected components of the non-outline
pixels that do not touch the image border (that is the background, or a cell with an open
outline, which cannot be recovered) and have at least ``min_area`` px (stroke gaps).
``dilate=True`` grows each instance by 1 px into the outline so it covers its contour; cells
sharing an outline then overlap on it.

Counts: "read" is every interior component found; those dropped by the rule are listed by reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from cellrcnn.data.converters.common import (
    ImageResult,
    Report,
    parse_fractions,
    run_tasks,
    write_bytes,
    write_coco,
)
from cellrcnn.data.converters.instances import (
    decode_image,
    filled_from_outlines,
    grey_png_if_equal,
    label_annotations,
    outline_pixels,
)
from cellrcnn.data.converters.sourcefs import Ref, read_ref, ref_name


@dataclass
class Pair:
    """One annotated image: where its pixels and its outline drawing are, and what they show."""

    # sort/split key: the image's own name (below its image folder), not its path in the source,
    # so the split does not depend on how deep the user unpacked the download
    key: str
    file_name: str  # output path under images/ (suffix may change when re-encoded)
    image: Ref
    outline: Ref
    category_id: int


@dataclass
class _Task:
    pair: Pair
    min_area: int
    dilate: bool
    flip_outlines: bool
    out_images: str


def read_dib(data: bytes, name: str) -> np.ndarray:
    """Header-less Windows bitmap (Cellomics ArrayScan ``.DIB``, as in BBBC018) -> H×W array.

    16-bit grey files (not handled by Pillow) are read directly: a BITMAPINFOHEADER followed by
    little-endian uint16 rows, bottom-up when the stored height is positive. Other bit depths
    go through Pillow's DIB reader."""
    if len(data) < 40:
        raise ValueError(f"{name}: too short for a DIB header ({len(data)} bytes)")
    header, width, height, _planes, bits = struct.unpack_from("<IiiHH", data, 0)
    if bits == 16 and header in (40, 52, 56, 108, 124):
        rows = abs(height)
        need = header + width * rows * 2
        if width <= 0 or len(data) < need:
            raise ValueError(f"{name}: {len(data)} bytes, expected {need} for {width}×{rows} 16-bit")
        arr = np.frombuffer(data, "<u2", count=width * rows, offset=header).reshape(rows, width)
        return np.ascontiguousarray(arr[::-1] if height > 0 else arr)
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data), formats=["DIB"]) as im:
        return np.asarray(im.convert("L") if im.mode in ("P", "1") else im)


def _image_bytes(pair: Pair) -> tuple[np.ndarray, bytes, str]:
    """Decoded pixels, bytes to write and output file name (DIB and equal-RGB re-encoded to PNG)."""
    data = read_ref(pair.image)
    if PurePosixPath(pair.image[1]).suffix.lower() == ".dib":
        arr = read_dib(data, ref_name(pair.image))
        ok, buf = cv2.imencode(".png", arr)
        if not ok:
            raise ValueError(f"{ref_name(pair.image)}: cannot re-encode as PNG")
        return arr, buf.tobytes(), str(PurePosixPath(pair.file_name).with_suffix(".png"))
    arr = decode_image(data, pair.image[1])
    grey = grey_png_if_equal(arr)
    if grey is not None:
        return arr, grey, str(PurePosixPath(pair.file_name).with_suffix(".png"))
    return arr, data, pair.file_name


def _convert_pair(task: _Task) -> ImageResult:
    pair = task.pair
    res = ImageResult(key=pair.key, extra={"source_file": pair.key})
    with res.guard(ref_name(pair.image)):
        arr, data, res.file_name = _image_bytes(pair)
        res.height, res.width = (int(v) for v in arr.shape[:2])
        write_bytes(Path(task.out_images) / res.file_name, data)
    if not res.ok:
        return res
    with res.guard(ref_name(pair.outline)):
        outline = outline_pixels(decode_image(read_ref(pair.outline), pair.outline[1]))
        if outline.shape != (res.height, res.width):
            raise ValueError(f"outline is {outline.shape} but the image is {(res.height, res.width)} (H×W)")
        if task.flip_outlines:
            outline = outline[::-1]
        labels, found, dropped = filled_from_outlines(outline, task.min_area)
        res.n_read = found
        for reason, count in dropped.items():
            res.drop(reason, count)
        res.annotations = label_annotations(labels, pair.category_id, grow_into=outline if task.dilate else None)
    return res


def convert_pairs(pairs: list[Pair], out: str | Path, *, source: str, licence: str, url: str,
                  categories: list[dict], report: Report, min_area: int = 16, dilate: bool = False,
                  flip_outlines: bool = False, splits: str | None = None, workers: int | None = None) -> Path:
    """Run the outline rule over ``pairs`` and write COCO (hash splits: no official split; the
    sets are small, BBBC009 has 5 images, and ``cho`` takes any user's folder, so one validation
    image is guaranteed from 3 images on)."""
    out_images = str(Path(out) / "images")
    tasks = [_Task(p, min_area, dilate, flip_outlines, out_images) for p in sorted(pairs, key=lambda p: p.key)]
    results = run_tasks(_convert_pair, tasks, report, workers, desc=source)
    options = {"min_area": min_area, "dilate": dilate, "flip_outlines": flip_outlines, "connectivity": 4}
    return write_coco(out, results, source=source, licence=licence, url=url, categories=categories,
                      report=report, fractions=parse_fractions(splits), options=options, ensure_val=True)


def pair_by_folder(files: dict[str, Ref], image_dir: str, outline_dir: str, report: Report,
                   outline_suffixes: tuple[str, ...] = ()) -> list[tuple[str, str, Ref, Ref]]:
    """(key, relative path, image ref, outline ref) for images under a folder named ``image_dir``
    whose outline sits at the same relative path under ``outline_dir`` (any listed suffix).
    The key is that path below ``image_dir``: the folders above it are the user's, not the data's."""
    found = []
    for name in sorted(files):
        parts = PurePosixPath(name).parts
        if image_dir not in parts[:-1] or PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        i = parts.index(image_dir)
        rel = PurePosixPath(*parts[i + 1:])
        base = PurePosixPath(*parts[:i], outline_dir, *rel.parts)
        candidates = [str(base)] + [str(base.with_suffix(s)) for s in outline_suffixes]
        outline = next((c for c in candidates if c in files), None)
        if outline is None:
            report.problem(ref_name(files[name]), f"no outline file {base}; image skipped")
            continue
        found.append((str(rel), str(rel), files[name], files[outline]))
    return found


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".dib")
