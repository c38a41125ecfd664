"""A folder of images with integer label images (Cellpose, StarDist, ``_seg.npy``) -> COCO.

Layouts (DATASETS.md §11), searched in ``src`` and in ``src/{train,val,test}`` (then the
official split, with val carved from train by hash when only train/test exist):
- StarDist: ``images/<name>`` + ``masks/<name>`` (same name; another label suffix is accepted),
  also when ``src`` is the ``images/`` folder itself;
- Cellpose: ``<name>.<ext>`` + ``<name>_masks.<ext>`` in one folder (``mask_suffix``,
  ``img_filter`` as Cellpose's ``--mask_filter``/``--img_filter``), or Cellpose's own output
  ``<name>_cp_masks.<ext>``, either beside the image or in a ``masks/`` sub-folder (where the
  image's own name is accepted too); files ending ``_masks``, ``_flows``, ``_cellprob``,
  ``_cp_output``, ``_seg`` are not images;
- Cellpose GUI: ``<name>_seg.npy`` next to ``<name>.<ext>`` (only its ``masks`` is used; the file is
  a pickle, which can run code when loaded, so it is read only with ``--allow-pickle``).
Each non-zero label value is one instance (values need not be consecutive; a disconnected label
stays one instance). Images are copied byte for byte. Without an official ``val`` folder, a set
of 3 or more images always gets at least one validation image (printed when the hash gave none).
"""

from __future__ import annotations

import io
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
from cellrcnn.data.converters.instances import decode_image, label_annotations
from cellrcnn.io import LABEL_SUFFIXES, image_files

NAME = "folder"
NOT_IMAGES = ("_masks", "_flows", "_cellprob", "_cp_output", "_seg", "_cp_masks")


@dataclass
class _Task:
    key: str
    file_name: str
    image: str
    labels: str
    split: str | None
    out_images: str
    allow_pickle: bool = False


def read_labels(path: str, allow_pickle: bool = False) -> np.ndarray:
    """Label image file (TIFF/PNG/NPY or Cellpose ``_seg.npy``) -> 2-D int64 H×W.

    A ``_seg.npy`` is a pickle (loading one runs code from the file): read only with ``allow_pickle``."""
    data = Path(path).read_bytes()
    if path.endswith("_seg.npy"):
        if not allow_pickle:
            raise ValueError("a Cellpose _seg.npy is a pickle, and loading one runs code from the file; "
                             "convert with --allow-pickle only if you trust it")
        arr = np.load(io.BytesIO(data), allow_pickle=True).item()["masks"]
    else:
        arr = decode_image(data, path)
    arr = np.asarray(arr)
    if arr.ndim == 3 and all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
        arr = arr[..., 0]  # labels exported as equal-channel RGB
    if arr.ndim != 2 or arr.dtype.kind not in "iub" or (arr.dtype.kind == "i" and arr.min() < 0):
        raise ValueError(f"not a 2-D non-negative integer label image (shape {arr.shape}, dtype {arr.dtype})")
    return arr.astype(np.int64)


def _convert_image(task: _Task) -> ImageResult:
    res = ImageResult(key=task.key, file_name=task.file_name, split=task.split)
    with res.guard(task.image):
        data = Path(task.image).read_bytes()
        res.height, res.width = (int(v) for v in decode_image(data, task.image).shape[:2])
        write_bytes(Path(task.out_images) / task.file_name, data)
    if not res.ok:
        return res
    with res.guard(task.labels):
        labels = read_labels(task.labels, task.allow_pickle)
        if labels.shape != (res.height, res.width):
            raise ValueError(f"labels are {labels.shape} but the image is {(res.height, res.width)} (H×W)")
        res.n_read = int(np.count_nonzero(np.unique(labels)))
        res.annotations = label_annotations(labels)
    return res


def _first(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def label_candidates(folder: Path, stem: str, name: str, mask_suffix: str) -> list[Path]:
    """Where the label image of ``folder/name`` may be, in order: ``<stem><mask_suffix>.*`` and
    Cellpose's own output ``<stem>_cp_masks.*`` beside it or in a ``masks/`` sub-folder, the same
    name in ``masks/``, then the GUI's ``<stem>_seg.npy``."""
    found = []
    for where in (folder, folder / "masks"):
        for suffix in dict.fromkeys((mask_suffix, "_cp_masks")):
            found += [where / f"{stem}{suffix}{s}" for s in LABEL_SUFFIXES]
    found += [folder / "masks" / name] + [folder / "masks" / f"{stem}{s}" for s in LABEL_SUFFIXES]
    return found + [folder / f"{Path(name).stem}_seg.npy"]


def find_pairs(folder: Path, mask_suffix: str, img_filter: str, report: Report) -> list[tuple[Path, Path]]:
    """(image, label file) pairs in one folder, StarDist layout first, else Cellpose naming."""
    if folder.name == "images" and (folder.parent / "masks").is_dir():
        folder = folder.parent  # the StarDist images/ folder itself was given: its masks/ is a sibling
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        pairs = []
        for img in image_files(folder / "images"):
            lab = _first([folder / "masks" / img.name] + [folder / "masks" / (img.stem + s) for s in LABEL_SUFFIXES])
            if lab is None:
                report.problem(str(img), f"no label image masks/{img.name}; skipped")
            else:
                pairs.append((img, lab))
        return pairs
    pairs = []
    for img in image_files(folder):  # sorted; hidden and macOS "._" files skipped
        stem = img.stem
        if stem.endswith(NOT_IMAGES):
            continue
        if img_filter:
            if not stem.endswith(img_filter):
                continue
            stem = stem[: -len(img_filter)]
        lab = _first(label_candidates(folder, stem, img.name, mask_suffix))
        if lab is None:
            report.problem(str(img), f"no {stem}{mask_suffix}.*, {stem}_cp_masks.* (beside it or in masks/) "
                           f"or {img.stem}_seg.npy label file; skipped")
        else:
            pairs.append((img, lab))
    return pairs


def convert(src: str | Path, out: str | Path, *, mask_suffix: str = "_masks", img_filter: str = "",
            licence: str = "unspecified", name: str = NAME, splits: str | None = None, strict: bool = False,
            workers: int | None = None, allow_pickle: bool = False) -> Path:
    """Convert a folder of images + label images into COCO under ``out`` (``name`` tags the source).
    ``allow_pickle``: read Cellpose ``_seg.npy`` files (pickles: only files you trust)."""
    report = Report(strict=strict)
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder")
    groups = [(src / s, s) for s in ("train", "val", "test") if (src / s).is_dir()] or [(src, None)]
    tasks = []
    for folder, split in groups:
        for img, lab in find_pairs(folder, mask_suffix, img_filter, report):
            file_name = f"{split}/{img.name}" if split else img.name
            tasks.append(_Task(file_name, file_name, str(img), str(lab), split, str(Path(out) / "images"),
                               allow_pickle))
    if not tasks:
        raise ConversionError(f"{src}: no image/label pairs found (StarDist images/+masks/, Cellpose *_masks.*, *_seg.npy)")
    results = run_tasks(_convert_image, tasks, report, workers, desc=name)
    official = {t.split for t in tasks}
    return write_coco(out, results, source=name, licence=licence, url=str(src), report=report,
                      categories=[{"id": 1, "name": "cell", "supercategory": "cell"}], fractions=parse_fractions(splits),
                      carve_val="val" not in official, ensure_val="val" not in official, options={"mask_suffix": mask_suffix, "img_filter": img_filter})
