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
    return {p.stem: json.loads(p.read_text()) for p in files}


def _rle_of(seg, h: int, w: int):
    """Segmentation -> (pycocotools RLE, problem or None)."""
    if isinstance(seg, dict):
        if list(seg.get("size", [])) != [h, w]:
            return None, f"RLE size {seg.get('size')} is not the image size {[h, w]}"
        counts = seg.get("counts")
        if isinstance(counts, list):
            if sum(counts) != h * w:
                return None, f"uncompressed RLE covers {sum(counts)} px, image has {h * w}"
            return mask_utils.frPyObjects(seg, h, w), None
        return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}, None
    if isinstance(seg, list):
        coords = [np.asarray(p, float) for p in seg]
        if any(len(c) < 6 or len(c) % 2 for c in coords):
            return None, "polygon with fewer than 3 points or an odd number of coordinates"
        if any((c[0::2] < 0).any() or (c[0::2] > w).any() or (c[1::2] < 0).any() or (c[1::2] > h).any()
               for c in coords):
            return None, "polygon outside the image"
        return mask_utils.merge(mask_utils.frPyObjects([c.tolist() for c in coords], h, w)), None
    return None, f"unknown segmentation type {type(seg).__name__}"


def check_annotation(ann: dict, img: dict) -> list[str]:
    """Problems of one annotation against its image (mask inside, area and box = mask's)."""
    h, w = img["height"], img["width"]
    x, y, bw, bh = (float(v) for v in ann["bbox"])
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
    try:
        docs = load_split_files(root, standard_only=False)
    except ValueError as exc:
        return [f"{root}/annotations: invalid JSON ({exc})"]
    problems: list[str] = []
    if not docs:
        problems.append(f"{root}/annotations: no JSON files")
    image_ids: set[int] = set()
    ann_ids: set[int] = set()
    file_names: set[str] = set()
    for split, doc in docs.items():
        where = f"annotations/{split}.json"
        if split not in STANDARD:  # a re-split of the same images: unique within itself only
            image_ids, ann_ids, file_names = set(), set(), set()
        missing = [k for k in ("info", "images", "annotations", "categories") if k not in doc]
        if missing or not isinstance(doc.get("annotations"), list):
            problems.append(f"{where}: missing or malformed keys {missing or ['annotations (not a list)']}")
            continue
        for key in ("source", "licence"):
            if key not in doc["info"]:
                problems.append(f"{where}: info has no '{key}'")
        cats = {c["id"] for c in doc["categories"]}
        images = {}
        for img in doc["images"]:
            if any(k not in img for k in IMAGE_KEYS):
                problems.append(f"{where}: image {img.get('id')} lacks one of {IMAGE_KEYS}")
                continue
            if img["id"] in image_ids:
                problems.append(f"{where}: image id {img['id']} is not unique")
            if img["file_name"] in file_names:
                problems.append(f"{where}: file {img['file_name']} listed twice")
            image_ids.add(img["id"])
            file_names.add(img["file_name"])
            images[img["id"]] = img
        for ann in doc["annotations"]:
            name = f"{where}: annotation {ann.get('id')}"
            if any(k not in ann for k in ANN_KEYS):
                problems.append(f"{name}: lacks one of {ANN_KEYS}")
                continue
            if ann["id"] in ann_ids:
                problems.append(f"{name}: id is not unique")
            ann_ids.add(ann["id"])
            if ann["image_id"] not in images:
                problems.append(f"{name}: unknown image_id {ann['image_id']}")
                continue
            if ann["category_id"] not in cats:
                problems.append(f"{name}: unknown category_id {ann['category_id']}")
            problems += [f"{name} ({images[ann['image_id']]['file_name']}): {p}"
                         for p in check_annotation(ann, images[ann["image_id"]])]
        if check_images:
            # annotation-only sets (and their part of a merge) have no files: check those present
            optional = bool(doc["info"].get("annotation_only", False))
            problems += _check_images(root, where, images.values(), optional)
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
