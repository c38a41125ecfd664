"""U-Net ``data/membrane`` (ISBI 2012 EM, zhixuhao/unet) -> COCO instances.

Source (DATASETS.md §9): ``image/<n>.png`` and ``label/<n>.png`` at any depth of a folder or
zip: ``data/membrane/train/...`` of the repository, or the repository zip that
``convert download membrane`` fetches (``unet-master.zip``, read in place), 512×512 8-bit. Label 255 (white) is cell interior, 0 the membrane.
Instances are the 4-connected components of ``label > 127``; components touching the border
are cells too and are kept. ``min_area`` (default 0: keep all) drops specks, ``dilate`` grows
each cell by 1 px into the membrane. Names are numeric and sorted numerically (0, 1, 2, …, 10),
not lexically. The test split upstream has no labels, so splits are by hash of the number.
The ``train/aug`` folder is augmentation output, not ground truth, and is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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
from cellrcnn.data.converters.sourcefs import Ref, SourceTree, read_ref, ref_name

NAME = "membrane"
LICENCE = "ISBI 2012 terms: non-commercial segmentation research; cite TrakEM2 and Cardona et al. 2010"
URL = "https://github.com/zhixuhao/unet/tree/master/data/membrane"
CATEGORIES = [{"id": 1, "name": "cell", "supercategory": "cell"}]


@dataclass
class _Task:
    key: str
    image: Ref
    label: Ref
    min_area: int
    dilate: bool
    out_images: str


def numeric_key(stem: str) -> str:
    """Zero-padded for numeric names so that sorting by key is numeric ("2" before "10")."""
    return f"{int(stem):09d}" if stem.isdigit() else stem


def _convert_image(task: _Task) -> ImageResult:
    res = ImageResult(key=task.key, file_name=PurePosixPath(task.image[1]).name)
    with res.guard(ref_name(task.image)):
        data = read_ref(task.image)
        res.height, res.width = (int(v) for v in decode_image(data, task.image[1]).shape[:2])
        write_bytes(Path(task.out_images) / res.file_name, data)
    if not res.ok:
        return res
    with res.guard(ref_name(task.label)):
        label = drop_alpha(decode_image(read_ref(task.label), task.label[1]))
        label = label.max(axis=-1) if label.ndim == 3 else label
        if label.shape != (res.height, res.width):
            raise ValueError(f"label is {label.shape} but the image is {(res.height, res.width)} (H×W)")
        cells = label > (127 if label.dtype == np.uint8 else 0)
        labels, found, small = binary_instances(cells, task.min_area, connectivity=4)
        res.n_read = found
        res.drop(f"under {task.min_area} px", small)
        res.annotations = label_annotations(labels, 1, grow_into=~cells if task.dilate else None)
    return res


def _files_in(tree: SourceTree, folder: str) -> dict[str, str]:
    """Stem -> path of the image files in folders named ``folder`` (the first such folder only:
    a second copy elsewhere in the tree would pair images with the wrong labels)."""
    names = sorted(n for n in tree.files if PurePosixPath(n).parent.name == folder
                   and PurePosixPath(n).suffix.lower() in (".png", ".tif", ".tiff"))
    parents = sorted({str(PurePosixPath(n).parent) for n in names}, key=lambda p: (p.count("/"), p))
    return {PurePosixPath(n).stem: n for n in names if str(PurePosixPath(n).parent) == parents[0]} if names else {}


def convert(src: str | Path, out: str | Path, *, min_area: int = 0, dilate: bool = False,
            splits: str | None = None, strict: bool = False, workers: int | None = None) -> Path:
    """Convert a membrane folder or zip (``image/`` + ``label/`` at any depth) into COCO under ``out``."""
    report = Report(strict=strict)
    tree = SourceTree(src)
    images, labels = _files_in(tree, "image"), _files_in(tree, "label")
    if not images or not labels:
        raise ConversionError(f"{src}: expected image/ and label/ folders (e.g. data/membrane/train/image and "
                              "train/label, or the unet-master.zip that `download membrane` fetches)")
    tasks = []
    for stem in sorted(images, key=numeric_key):
        if stem not in labels:
            report.problem(ref_name(tree.files[images[stem]]), "no label with the same name; skipped")
            continue
        tasks.append(_Task(numeric_key(stem), tree.files[images[stem]], tree.files[labels[stem]], min_area, dilate,
                           str(Path(out) / "images")))
    for stem in sorted(set(labels) - set(images), key=numeric_key):
        report.problem(ref_name(tree.files[labels[stem]]), "label without an image; skipped")
    if not tasks:
        raise ConversionError(f"{src}: no image/label pairs found")
    results = run_tasks(_convert_image, tasks, report, workers, desc=NAME)
    return write_coco(out, results, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                      fractions=parse_fractions(splits),
                      options={"min_area": min_area, "dilate": dilate, "connectivity": 4, "foreground": "label > 127"})
