"""BBBC038 / Kaggle 2018 Data Science Bowl nuclei -> COCO.

Sources (DATASETS.md §1):
- ``stage1_train.zip`` read in place, its extracted folder, or a folder holding the zip (read
  when the folder has no extracted images): ``<ImageId>/images/<ImageId>.png``
  and one PNG per nucleus in ``<ImageId>/masks/``. An image without masks is reported and not
  written (the layout has no empty masks/ folders); a zip without any masks, such as
  ``stage1_test.zip``, is an error that asks for ``labels``. A top-level folder, directory entries and
  ``__MACOSX`` entries are all tolerated. Each mask PNG is one instance (split nuclei stay one
  instance; overlapping masks, as in the community-fixed release, are kept as they are).
- RLE CSVs (``labels=``): ``stage1_train_labels.csv`` (ImageId, EncodedPixels),
  ``stage1_solution.csv`` / ``stage2_solution_final.csv`` (+ Height, Width, Usage): column-major,
  1-based ``start length`` pairs; ``Ignored`` rows (stage-2 decoys) are dropped, ``Public`` and
  ``Private`` kept. Images come from ``src`` (a stage-1/2 zip or folder); a CSV with Height/Width
  also converts without images (``images=False``).

Splits: solution CSVs are the official test set (written to ``test``); the training set has no
official split and is split by the hash of the ImageId.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

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
from cellrcnn.data.converters.instances import as_binary, decode_image
from cellrcnn.data.converters.sourcefs import Ref, SourceTree, read_ref, ref_name
from cellrcnn.data.masks import decode_rle_string

NAME = "bbbc038"
LICENCE = "CC0 1.0"
URL = "https://bbbc.broadinstitute.org/BBBC038"
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]


@dataclass
class _Task:
    image_id: str
    image: Ref | None
    masks: list[tuple[str, Ref]]
    rles: list[tuple[str, str]]  # (where, rle string) from a CSV
    height: int
    width: int
    split: str | None
    out_images: str


def find_images(tree: SourceTree, report: Report) -> dict[str, tuple[str, list[str]]]:
    """ImageId -> (image path, sorted mask paths) from any depth of the DSB layout."""
    images: dict[str, list[str]] = {}
    masks: dict[str, list[str]] = {}
    for name in tree.files:
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or PurePosixPath(name).suffix.lower() != ".png":
            continue
        if parts[-2] == "images":
            images.setdefault(parts[-3], []).append(name)
        elif parts[-2] == "masks":
            masks.setdefault(parts[-3], []).append(name)
    found = {}
    for image_id, names in sorted(images.items()):
        if len(names) > 1:  # the layout holds exactly one; prefer the one named after the folder
            named = [n for n in names if PurePosixPath(n).stem == image_id]
            report.problem(f"{tree.root}:{image_id}/images", f"{len(names)} images; expected one, using "
                           f"{(named or sorted(names))[0]}")
            names = named or sorted(names)
        found[image_id] = (names[0], sorted(masks.get(image_id, [])))
    for image_id in sorted(set(masks) - set(images)):
        report.problem(f"{tree.root}:{image_id}/images", f"missing image; its {len(masks[image_id])} masks skipped")
        found[image_id] = ("", sorted(masks[image_id]))  # counted as read, not written
    return found


def read_rle_csvs(paths: list[Path], report: Report) -> dict[str, dict]:
    """ImageId -> {rles: [(where, rle)], height, width, split} from one or more DSB CSVs."""
    by_image: dict[str, dict] = {}
    for path in paths:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"ImageId", "EncodedPixels"} <= cols:
                raise ConversionError(f"{path}: expected columns ImageId,EncodedPixels; found {sorted(cols)}")
            for line, row in enumerate(reader, start=2):
                if row.get("Usage", "").strip() == "Ignored":
                    continue  # stage-2 decoy images carry no ground truth
                entry = by_image.setdefault(row["ImageId"], {"rles": [], "height": 0, "width": 0,
                                                             "split": "test" if "Usage" in cols else None,
                                                             "sized": {"Height", "Width"} <= cols})
                try:
                    if row.get("Height") and row.get("Width"):
                        entry["height"], entry["width"] = int(row["Height"]), int(row["Width"])
                except ValueError:
                    report.problem(f"{path}:{line}", f"bad Height/Width {row['Height']!r}/{row['Width']!r}")
                rle = (row["EncodedPixels"] or "").strip()
                if rle and rle not in ("nan", "-1"):  # an empty row lists an image without nuclei
                    entry["rles"].append((f"{path.name}:{line} ({row['ImageId'][:12]}…)", rle))
    return by_image


def _convert_image(task: _Task) -> ImageResult:
    res = ImageResult(key=task.image_id, split=task.split, n_read=len(task.rles) or len(task.masks),
                      extra={"source_id": task.image_id})
    h, w = task.height, task.width
    suffix = PurePosixPath(task.image[1]).suffix.lower() if task.image else ".png"
    res.file_name = f"{task.image_id}{suffix}"
    if task.image is not None:
        with res.guard(ref_name(task.image)):
            data = read_ref(task.image)
            h, w = decode_image(data, task.image[1]).shape[:2]
            if task.height and (h, w) != (task.height, task.width):
                raise ValueError(f"image is {h}×{w} (H×W) but the CSV says {task.height}×{task.width}")
            write_bytes(Path(task.out_images) / res.file_name, data)  # PNG copied as is, not re-encoded
        if not res.ok:
            return res
    res.height, res.width = int(h), int(w)
    for _, ref in ([] if task.rles else task.masks):
        with res.guard(ref_name(ref), fatal=False):
            raw = cv2.imdecode(np.frombuffer(read_ref(ref), np.uint8), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise ValueError("cannot decode mask PNG")
            mask = raw > 0 if raw.ndim == 2 else as_binary(raw)
            if mask.shape != (h, w):
                raise ValueError(f"mask is {mask.shape[0]}×{mask.shape[1]} but the image is {h}×{w} (H×W)")
            ann = mask_annotation(mask, 1)
            if ann is None:
                raise ValueError("empty mask")
            res.annotations.append(ann)
    for where, rle in task.rles:
        with res.guard(where, fatal=False):
            ann = mask_annotation(decode_rle_string(rle, h, w, order="F"), 1)
            if ann is None:
                raise ValueError("empty RLE")
            res.annotations.append(ann)
    return res


def convert(src: str | Path | None, out: str | Path, *, labels: list[str | Path] | None = None,
            images: bool = True, splits: str | None = None, strict: bool = False,
            workers: int | None = None) -> Path:
    """Convert a DSB zip/folder (masks from PNGs, or from ``labels`` CSVs) to COCO in ``out``."""
    report = Report(strict=strict)
    out = Path(out)
    csvs = [Path(p) for p in (labels or [])]
    if src is not None and Path(src).suffix.lower() == ".csv":
        csvs.append(Path(src))
        src = None
    if src is None and not csvs:
        raise ConversionError("bbbc038: give --src (zip or folder) and/or --labels CSV")
    tree = SourceTree(src, mount_zips=False) if src is not None and images else None
    found = find_images(tree, report) if tree is not None else {}
    if tree is not None and not found and tree.root.is_dir():
        tree = SourceTree(src)  # no extracted images: look inside the zips of the folder
        found = find_images(tree, report)
    rows = read_rle_csvs(csvs, report) if csvs else {}
    tasks, missing = [], []
    out_images = str(out / "images")
    if csvs:
        if set(found) - set(rows):
            print(f"bbbc038: {len(set(found) - set(rows)):,} images of {src} have no rows in the CSV(s); not converted")
        for image_id, entry in sorted(rows.items()):
            ref = None
            if tree is not None:
                if not found.get(image_id, ("",))[0]:
                    report.problem(f"{src}:{image_id}", f"image listed in the CSV is missing; its "
                                   f"{len(entry['rles'])} RLE rows skipped")
                    missing.append(ImageResult(key=image_id, n_read=len(entry["rles"]), ok=False))
                    continue
                ref = tree.files[found[image_id][0]]
            elif not entry["height"] and entry.get("sized"):  # only this image's sizes are bad: skip it alone
                report.problem(f"{image_id}", f"no valid Height/Width in its CSV rows; its {len(entry['rles'])} "
                               "RLE rows skipped")
                missing.append(ImageResult(key=image_id, n_read=len(entry["rles"]), ok=False))
                continue
            elif not entry["height"]:
                raise ConversionError(f"{csvs[0]}: no Height/Width columns; converting without images needs them")
            tasks.append(_Task(image_id, ref, [], entry["rles"], entry["height"], entry["width"],
                               entry["split"], out_images))
    elif tree is not None:
        if found and not any(masks for _, masks in found.values()):
            raise ConversionError(f"bbbc038: {src} holds {len(found):,} images but no masks/ folders (a test-stage "
                                  "zip?); give the masks as RLE with --labels, e.g. stage1_solution.csv")
        for image_id, (image, masks) in found.items():
            if not image:
                missing.append(ImageResult(key=image_id, n_read=len(masks), ok=False))
                continue
            if not masks:
                report.problem(ref_name(tree.files[image]), "no masks/ folder beside the image; skipped")
                missing.append(ImageResult(key=image_id, ok=False))  # counted as read, not written
                continue
            tasks.append(_Task(image_id, tree.files[image], [(m, tree.files[m]) for m in masks], [], 0, 0,
                               None, out_images))
    if not tasks:
        raise ConversionError(f"bbbc038: no images found in {src or csvs}")
    results = run_tasks(_convert_image, tasks, report, workers, desc=NAME) + missing
    options = {"masks_from": "csv" if csvs else "png", "splits": list(parse_fractions(splits))}
    return write_coco(out, results, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                      fractions=parse_fractions(splits), options=options, annotation_only=tree is None)

