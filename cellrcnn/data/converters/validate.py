"""Check a converted COCO folder: schema, ids, masks inside images, boxes consistent with
masks, and every image readable at its declared size.

``validate(root)`` returns a list of problems (empty = valid), each naming the file and object.
Masks are checked from their RLE (area and box from pycocotools, no full decode) so a set with
tens of thousands of instances validates in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from cellrcnn.data.converters.common import check_relative_name
from cellrcnn.data.masks import MaskFormatError, check_segmentation
from cellrcnn.io import ImageReadError, read_image

IMAGE_KEYS = ("id", "file_name", "height", "width")
ANN_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")


STANDARD = ("train", "val", "test")


def load_split_files(root: Path, standard_only: bool = True) -> dict[str, dict]:
    """Split name -> parsed COCO document: ``annotations/{train,val,test}.json`` (the converter's
    partition of the images), or every ``annotations/*.json`` (extra files such as re-splits
    of the same images) with ``standard_only=False``."""
    files = [root / "annotations" / f"{s}.json" for s in STANDARD if (root / "annotations" / f"{s}.json").is_file()]
    if not standard_only or not files:
        files += sorted(p for p in (root / "annotations").glob("*.json") if p not in files)
    docs = {}
    for p in files:
        docs.update(load_split_files_one(p))  # ValueError naming the file (empty, invalid JSON)
    return docs


def _rle_of(seg, h: int, w: int):
    """Segmentation -> (pycocotools RLE, problem or None). Geometry and RLE are checked first
    (:func:`cellrcnn.data.masks.check_segmentation`: finite polygon coordinates inside the image,
    RLE runs summing to H×W), so pycocotools never sees a NaN, a huge coordinate or a broken RLE."""
    try:
        check_segmentation(seg, h, w, margin=0.0)
    except MaskFormatError as exc:
        return None, str(exc)
    if isinstance(seg, dict):
        counts = seg["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(seg, h, w), None
        return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}, None
    return mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], h, w)), None


def check_annotation(ann: dict, img: dict) -> list[str]:
    """Problems of one annotation against its image (mask inside, area and box = mask's)."""
    h, w = img["height"], img["width"]
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
            and np.isfinite(bbox).all()):
        return [f"bbox {bbox!r} is not 4 finite numbers"]
    x, y, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0 or x < 0 or y < 0 or x + bw > w + 1e-6 or y + bh > h + 1e-6:
        return [f"bbox {ann['bbox']} empty or outside the {h}×{w} image"]
    seg = ann.get("segmentation")
    if not seg:
        return []  # box-only annotation
    try:
        rle, problem = _rle_of(seg, h, w)
    except Exception as exc:  # pycocotools raises bare ValueError/TypeError for bad input
        return [f"segmentation cannot be decoded ({exc})"]
    if problem:
        return [problem]
    area = int(mask_utils.area(rle))
    if area == 0:
        return ["empty mask"]
    box = mask_utils.toBbox(rle)
    tol = 1e-6 if isinstance(seg, dict) else 1.0  # polygons rasterise to within a pixel of their box
    out = []
    if not isinstance(ann["area"], int | float) or isinstance(ann["area"], bool):
        return [f"area {ann['area']!r} is not a number"]
    if abs(area - float(ann["area"])) > (0.5 if isinstance(seg, dict) else max(2.0, 0.1 * area)):
        out.append(f"area {ann['area']} but the mask has {area} px")
    if np.abs(box - np.asarray([x, y, bw, bh])).max() > tol:
        out.append(f"bbox {ann['bbox']} but the mask's box is {[float(v) for v in box]}")
    return out


def validate(root: str | Path, check_images: bool = True) -> list[str]:
    """All problems found in the converted folder ``root`` (empty list: valid).

    Every ``annotations/*.json`` is checked on its own; ids and file names must moreover be
    unique across train/val/test, which partition the images (other files may re-split them)."""
    root = Path(root)
    if not (root / "annotations").is_dir():
        return [f"{root}: no annotations/ folder"]
    docs, problems = _load_each(root)
    if not docs and not problems:
        problems.append(f"{root}/annotations: no JSON files")
    image_ids: set[int] = set()
    ann_ids: set[int] = set()
    file_names: set[str] = set()
    for split, doc in docs.items():
        where = f"annotations/{split}.json"
        if split not in STANDARD:  # a re-split of the same images: unique within itself only
            image_ids, ann_ids, file_names = set(), set(), set()
        missing = [k for k in ("info", "images", "annotations", "categories") if k not in doc]
        if missing or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")) \
                or not isinstance(doc.get("info"), dict):
            problems.append(f"{where}: missing or malformed keys {missing or ['info, images, annotations or categories']}")
            continue
        for key in ("source", "licence"):
            if key not in doc["info"]:
                problems.append(f"{where}: info has no '{key}'")
        cats = {c["id"] for c in doc["categories"] if isinstance(c, dict) and _is_int(c.get("id"))}
        if len(cats) != len(doc["categories"]):
            problems.append(f"{where}: every category needs an integer id")
        images = {}
        for n, img in enumerate(doc["images"]):
            problem = _image_problem(img)
            if problem:
                problems.append(f"{where}: images[{n}] (id {img.get('id') if isinstance(img, dict) else None!r}): {problem}")
                continue
            if img["id"] in image_ids:
                problems.append(f"{where}: image id {img['id']} is not unique")
            if img["file_name"] in file_names:
                problems.append(f"{where}: file {img['file_name']} listed twice")
            image_ids.add(img["id"])
            file_names.add(img["file_name"])
            images[img["id"]] = img
        for n, ann in enumerate(doc["annotations"]):
            if not isinstance(ann, dict):
                problems.append(f"{where}: annotations[{n}] is a {type(ann).__name__}, not an object")
                continue
            name = f"{where}: annotation {ann.get('id')!r}"
            if any(k not in ann for k in ANN_KEYS):
                problems.append(f"{name}: lacks one of {ANN_KEYS}")
                continue
            if not all(_is_int(ann[k]) for k in ("id", "image_id", "category_id")):
                problems.append(f"{name}: id, image_id and category_id must be integers")
                continue
            if ann["id"] in ann_ids:
                problems.append(f"{name}: id is not unique")
            ann_ids.add(ann["id"])
            if ann["image_id"] not in images:
                problems.append(f"{name}: unknown image_id {ann['image_id']}")
                continue
            if ann["category_id"] not in cats:
                problems.append(f"{name}: unknown category_id {ann['category_id']}")
            try:
                found = check_annotation(ann, images[ann["image_id"]])
            except Exception as exc:  # garbage of a kind no rule foresaw: reported, never a crash
                found = [f"malformed ({type(exc).__name__}: {exc})"]
            problems += [f"{name} ({images[ann['image_id']]['file_name']}): {p}" for p in found]
        if check_images:
            # annotation-only sets (and their part of a merge) have no files: check those present
            optional = bool(doc["info"].get("annotation_only", False))
            problems += _check_images(root, where, images.values(), optional)
    return problems + _check_one_run(root, docs, check_images)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_each(root: Path) -> tuple[dict[str, dict], list[str]]:
    """Every annotation file parsed on its own: (split -> document, problems naming the file)."""
    docs, problems = {}, []
    for path in sorted((root / "annotations").glob("*.json")):
        try:
            docs.update(load_split_files_one(path))
        except ValueError as exc:
            problems.append(str(exc))
    return docs, problems


def load_split_files_one(path: Path) -> dict[str, dict]:
    """``{stem: document}`` of one annotation file; ValueError naming it when empty or not COCO JSON."""
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: " + ("empty file" if not path.stat().st_size else f"invalid JSON ({exc})")) from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: top level is a {type(doc).__name__}, not a COCO object")
    return {path.stem: doc}


def _image_problem(img) -> str | None:
    if not isinstance(img, dict):
        return f"a {type(img).__name__}, not an object"
    if any(k not in img for k in IMAGE_KEYS):
        return f"lacks one of {IMAGE_KEYS}"
    if not _is_int(img["id"]) or not _is_int(img["height"]) or not _is_int(img["width"]) \
            or img["height"] <= 0 or img["width"] <= 0:
        return "id, height and width must be integers (height, width > 0)"
    try:
        check_relative_name(img["file_name"])
    except ValueError as exc:
        return str(exc)
    return None


def _check_one_run(root: Path, docs: dict[str, dict], check_images: bool) -> list[str]:
    """train/val/test must come from one conversion run (the same ``info.run``), and together list
    every file under ``images/`` exactly once (an interrupted re-conversion leaves splits of two
    runs, or images no split lists)."""
    standard = {s: d for s, d in docs.items() if s in STANDARD and isinstance(d.get("info"), dict)}
    problems = []
    runs = {s: str(d["info"]["run"]) if d["info"].get("run") else None for s, d in standard.items()}
    if any(runs.values()) and len(set(runs.values())) > 1:
        problems.append("annotations: train/val/test come from different conversion runs ("
                        + ", ".join(f"{s}: {r}" for s, r in runs.items()) + "); convert again")
    if len(standard) < len(STANDARD) and any(runs.values()):
        problems.append(f"annotations: missing {sorted(set(STANDARD) - set(standard))} of one conversion run")
    listed = {img["file_name"] for d in standard.values()
              for img in (d.get("images") if isinstance(d.get("images"), list) else [])
              if isinstance(img, dict) and isinstance(img.get("file_name"), str)}
    if check_images and standard and (root / "images").is_dir():
        on_disk = {p.relative_to(root / "images").as_posix() for p in (root / "images").rglob("*")
                   if p.is_file() and not p.name.startswith(".")}
        extra = sorted(on_disk - listed)
        if extra:
            problems.append(f"images/: {len(extra)} file(s) listed in no split (left by another run?): "
                            + ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""))
    return problems


def _check_images(root: Path, where: str, images, optional: bool) -> list[str]:
    out = []
    for img in images:
        path = root / "images" / img["file_name"]
        if optional and not path.exists():
            continue
        try:
            shape = read_image(path).shape[:2]
        except ImageReadError as exc:
            out.append(f"{where}: {exc}")
            continue
        if shape != (img["height"], img["width"]):
            out.append(f"{where}: {path} is {shape[0]}×{shape[1]} but listed as {img['height']}×{img['width']}")
    return out
