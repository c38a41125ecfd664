"""U-Net ``data/membrane`` (ISBI 2012 EM, zhixuhao/unet) -> COCO instances.

Source (DATASETS.md §9): ``<src>/image/<n>.png`` and ``<src>/label/<n>.png`` (or ``<src>/train/...``,
the repository layout), 512×512 8-bit. Label 255 (white) is cell interior, 0 the membrane.
Instances are the 4-connected components of ``label > 127``; components touching the border
are cells too and are kept. ``min_area`` (default 0: keep all) drops specks, ``dilate`` grows
each cell by 1 px into the membrane. Names are numeric and sorted numerically (0, 1, 2, …, 10),
not lexically. The test split upstream has no labels, so splits are by hash of the number.
The ``train/aug`` folder is augmentation output, not ground truth, and is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellrcnn.data.converters.common import (
    ConversionError,
    ImageResult,
    Report,
    parse_fractions,
    run_tasks,
    write_bytes,
    write_coco,
)
from cellrcnn.data.converters.instances import binary_instances, decode_image, drop_alpha, label_annotations
from cellrcnn.io import image_files

NAME = "membrane"
LICENCE = "ISBI 2012 terms: non-commercial segmentation research; cite TrakEM2 and Cardona et al. 2010"
URL = "https://github.com/zhixuhao/unet/tree/master/data/membrane"
CATEGORIES = [{"id": 1, "name": "cell", "supercategory": "cell"}]


@dataclass
class _Task:
    key: str
    image: str
    label: str
    min_area: int
    dilate: bool
    out_images: str


def numeric_key(stem: str) -> str:
    """Zero-padded for numeric names so that sorting by key is numeric ("2" before "10")."""
    return f"{int(stem):09d}" if stem.isdigit() else stem


def _convert_image(task: _Task) -> ImageResult:
    res = ImageResult(key=task.key, file_name=Path(task.image).name)
    with res.guard(task.image):
        data = Path(task.image).read_bytes()
        res.height, res.width = (int(v) for v in decode_image(data, task.image).shape[:2])
        write_bytes(Path(task.out_images) / res.file_name, data)
    if not res.ok:
        return res
    with res.guard(task.label):
        label = drop_alpha(decode_image(Path(task.label).read_bytes(), task.label))
        label = label.max(axis=-1) if label.ndim == 3 else label
        if label.shape != (res.height, res.width):
            raise ValueError(f"label is {label.shape} but the image is {(res.height, res.width)} (H×W)")
        cells = label > (127 if label.dtype == np.uint8 else 0)
        labels, found, small = binary_instances(cells, task.min_area, connectivity=4)
        res.n_read = found
        res.drop(f"under {task.min_area} px", small)
        res.annotations = label_annotations(labels, 1, grow_into=~cells if task.dilate else None)
    return res


def convert(src: str | Path, out: str | Path, *, min_area: int = 0, dilate: bool = False,
            splits: str | None = None, strict: bool = False, workers: int | None = None) -> Path:
    """Convert a membrane folder (``image/`` + ``label/``) into COCO under ``out``."""
    report = Report(strict=strict)
    src = Path(src)
    base = src / "train" if (src / "train" / "image").is_dir() else src
    if not (base / "image").is_dir() or not (base / "label").is_dir():
        raise ConversionError(f"{src}: expected image/ and label/ folders (or train/image and train/label)")
    images = {p.stem: p for p in image_files(base / "image", (".png", ".tif", ".tiff"))}
    labels = {p.stem: p for p in image_files(base / "label", (".png", ".tif", ".tiff"))}
    tasks = []
    for stem in sorted(images, key=numeric_key):
        if stem not in labels:
            report.problem(str(images[stem]), "no label with the same name; skipped")
            continue
        tasks.append(_Task(numeric_key(stem), str(images[stem]), str(labels[stem]), min_area, dilate,
                           str(Path(out) / "images")))
    for stem in sorted(set(labels) - set(images), key=numeric_key):
        report.problem(str(labels[stem]), "label without an image; skipped")
    if not tasks:
        raise ConversionError(f"{src}: no image/label pairs found")
    results = run_tasks(_convert_image, tasks, report, workers, desc=NAME)
    return write_coco(out, results, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                      fractions=parse_fractions(splits),
                      options={"min_area": min_area, "dilate": dilate, "connectivity": 4, "foreground": "label > 127"})
