"""Kaggle Sartorius Cell Instance Segmentation (2021) -> COCO.

Source (DATASETS.md §7): a folder with ``train.csv`` (one row per cell: id, annotation, width,
height, cell_type, ...) and ``train/<id>.png``. The RLE is ``start length`` pairs, 1-based, in
**row-major** order (the opposite of the 2018 DSB). Each row is one instance; overlaps are
kept. The cell type goes on the image (``cell_type``) and the category is a single ``cell``.
Images are copied (grey PNG when stored as RGB with equal channels). ``images=False`` converts
the annotations alone (sizes from the CSV). No official split: split by hash of the image id.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from cellrcnn.data.converters.common import (
    ConversionError,
    ImageResult,
    Report,
    mask_annotation,
    parse_fractions,
    run_tasks,
    write_bytes,
    write_coco,
)
from cellrcnn.data.converters.instances import decode_image, grey_png_if_equal
from cellrcnn.data.converters.sourcefs import Ref, SourceTree, read_ref, ref_name
from cellrcnn.data.masks import decode_rle_string

NAME = "sartorius"
LICENCE = "Kaggle competition rules (LIVECell-derived part: CC BY-NC 4.0)"
URL = "https://www.kaggle.com/c/sartorius-cell-instance-segmentation"
CATEGORIES = [{"id": 1, "name": "cell", "supercategory": "cell"}]


@dataclass
class _Task:
    image_id: str
    image: Ref | None
    rles: list[tuple[str, str]]
    height: int
    width: int
    extra: dict
    out_images: str


def _convert_image(task: _Task) -> ImageResult:
    res = ImageResult(key=task.image_id, file_name=f"{task.image_id}.png", n_read=len(task.rles),
                      height=task.height, width=task.width, extra=task.extra)
    if task.image is not None:
        with res.guard(ref_name(task.image)):
            data = read_ref(task.image)
            arr = decode_image(data, task.image[1])
            if arr.shape[:2] != (task.height, task.width):
                raise ValueError(f"image is {arr.shape[:2]} but train.csv says {(task.height, task.width)} (H×W)")
            write_bytes(Path(task.out_images) / res.file_name, grey_png_if_equal(arr) or data)
        if not res.ok:
            return res
    for where, rle in task.rles:
        with res.guard(where, fatal=False):
            ann = mask_annotation(decode_rle_string(rle, task.height, task.width, order="C"), 1)
            if ann is None:
                raise ValueError("empty RLE")
            res.annotations.append(ann)
    return res


def read_train_csv(path: Path) -> dict[str, dict]:
    """Image id -> {rles: [(where, rle)], height, width, extra} from ``train.csv``."""
    rows: dict[str, dict] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"id", "annotation", "width", "height"}
        if not need <= set(reader.fieldnames or []):
            raise ConversionError(f"{path}: expected columns {sorted(need)}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            entry = rows.setdefault(row["id"], {"rles": [], "height": int(row["height"]), "width": int(row["width"]),
                                                "extra": {k: row[k] for k in ("cell_type", "sample_id", "plate_time",
                                                                              "sample_date", "elapsed_timedelta")
                                                          if k in row}})
            entry["rles"].append((f"{path.name}:{line} ({row['id']})", row["annotation"]))
    return rows


def convert(src: str | Path, out: str | Path, *, images: bool = True, splits: str | None = None,
            strict: bool = False, workers: int | None = None) -> Path:
    """Convert the Sartorius folder ``src`` (train.csv + train/) into COCO under ``out``."""
    report = Report(strict=strict)
    src = Path(src)
    csv_path = src if src.suffix.lower() == ".csv" else src / "train.csv"
    if not csv_path.is_file():
        raise ConversionError(f"{csv_path}: no such file (expected the competition's train.csv)")
    rows = read_train_csv(csv_path)
    if images and not (csv_path.parent / "train").is_dir():
        raise ConversionError(f"{csv_path.parent / 'train'}: no image folder (--no-images converts the CSV alone)")
    tree = SourceTree(csv_path.parent / "train", mount_zips=False) if images else None
    tasks, missing = [], []
    for image_id, entry in sorted(rows.items()):
        ref = None
        if tree is not None:
            ref = tree.files.get(f"{image_id}.png")
            if ref is None:
                report.problem(str(csv_path.parent / "train" / f"{image_id}.png"),
                               f"image missing; its {len(entry['rles'])} RLE rows skipped (--no-images keeps them)")
                missing.append(ImageResult(key=image_id, n_read=len(entry["rles"]), ok=False))
                continue
        tasks.append(_Task(image_id, ref, entry["rles"], entry["height"], entry["width"], entry["extra"],
                           str(Path(out) / "images")))
    results = run_tasks(_convert_image, tasks, report, workers, desc=NAME) + missing
    return write_coco(out, results, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                      fractions=parse_fractions(splits), options={"rle_order": "row-major", "images": images},
                      annotation_only=not images)
