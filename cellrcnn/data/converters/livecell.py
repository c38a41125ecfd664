"""LIVECell -> standard COCO (normalised and validated).

Source (DATASETS.md §8): the dataset root (``images.zip`` read in place, or ``images/...``, and
``annotations/LIVECell/livecell_coco_{train,val,test}.json``; with ``cell_type`` the per-type files
``annotations/LIVECell_single_cells/<type>/{train,val,test}.json`` or ``livecell_<type>_<split>.json``),
or a single annotation JSON (split from its name) with ``images_dir``.

Normalisation: ``annotations`` given as an object keyed by id (some distributed copies; it breaks
pycocotools) becomes a list; string ids become ints; polygons become compressed RLE with area
and bbox recomputed from the mask, so boxes match masks exactly. ``iscrowd`` is kept as given
(pycocotools treats crowd regions as ignored). Overlapping duplicate annotations are kept.
Validation: duplicate ids, annotations of unknown images or categories, and empty or malformed
segmentations are reported by id and skipped. Image ids are reassigned in file-name order, the
original kept as ``source_id``. ``images=False`` converts the annotations alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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
from cellrcnn.data.converters.instances import decode_image
from cellrcnn.data.converters.sourcefs import Ref, SourceTree, read_ref, ref_name
from cellrcnn.data.masks import decode_segmentation

NAME = "livecell"
LICENCE = "CC BY-NC 4.0"
URL = "https://github.com/sartorius-research/LIVECell"


@dataclass
class _Task:
    key: str
    image: dict
    ref: Ref | None
    anns: list[dict]
    split: str | None
    where: str
    out_images: str


def split_of_name(name: str) -> str | None:
    """train/val/test from an annotation file name (``livecell_coco_val.json``, ``test.json``)."""
    m = re.search(r"(train|val|test)", PurePosixPath(name).stem.lower())
    return m.group(1) if m else None


def load_coco(path: Path, data: bytes, report: Report) -> dict:
    """Parse one LIVECell JSON into lists with int ids (dict-keyed annotations accepted)."""
    doc = json.loads(data)
    for key in ("images", "annotations", "categories"):
        items = doc.get(key, [])
        doc[key] = list(items.values()) if isinstance(items, dict) else list(items)
    for key in ("images", "annotations", "categories"):
        for item in doc[key]:
            try:
                item["id"] = int(item["id"])
                if key == "annotations":
                    item["image_id"] = int(item["image_id"])
                    item["category_id"] = int(item["category_id"])
            except (KeyError, ValueError, TypeError) as exc:
                report.problem(str(path), f"{key[:-1]} {item.get('id')!r}: bad id ({exc})")
                item["id"] = None
        doc[key] = [item for item in doc[key] if item["id"] is not None]
    return doc


def _convert_image(task: _Task) -> ImageResult:
    img = task.image
    res = ImageResult(key=task.key, file_name=task.key, split=task.split, n_read=len(task.anns),
                      height=int(img["height"]), width=int(img["width"]), extra={"source_id": img["id"]})
    if task.ref is not None:
        with res.guard(ref_name(task.ref)):
            data = read_ref(task.ref)
            shape = decode_image(data, task.ref[1]).shape[:2]
            if shape != (res.height, res.width):
                raise ValueError(f"image is {shape} but the JSON says {(res.height, res.width)} (H×W)")
            write_bytes(Path(task.out_images) / res.file_name, data)
        if not res.ok:
            return res
    for ann in task.anns:
        with res.guard(f"{task.where}: annotation {ann['id']}", fatal=False):
            mask = decode_segmentation(ann.get("segmentation"), res.height, res.width)
            out = mask_annotation(mask, ann["category_id"], iscrowd=int(ann.get("iscrowd", 0)))
            if out is None:
                raise ValueError("empty segmentation")
            res.annotations.append(out)
    return res


def annotation_files(src: Path, cell_type: str | None) -> list[Path]:
    """The LIVECell-wide (or per-type) train/val/test JSONs under a dataset root."""
    if src.is_file():
        return [src]
    if cell_type:
        base = src / "annotations" / "LIVECell_single_cells" / cell_type.lower()
        found = sorted(base.glob("*.json")) if base.is_dir() else []
    else:
        found = sorted((src / "annotations" / "LIVECell").glob("livecell_coco_*.json"))
    found = found or sorted(p for p in src.glob("*.json") if split_of_name(p.name))
    if not found:
        raise ConversionError(f"{src}: no LIVECell annotation JSON found (annotations/LIVECell/livecell_coco_*.json)")
    return found


def convert(src: str | Path, out: str | Path, *, images: bool = True, images_dir: str | Path | None = None,
            cell_type: str | None = None, splits: str | None = None, strict: bool = False,
            workers: int | None = None) -> Path:
    """Convert LIVECell annotations (and images) from ``src`` into standard COCO under ``out``."""
    report = Report(strict=strict)
    src = Path(src)
    files = annotation_files(src, cell_type)
    index: dict[str, Ref] = {}
    if images:
        root = Path(images_dir) if images_dir else (src if src.is_dir() else src.parent)
        tree = SourceTree(root)
        index = {PurePosixPath(n).name: ref for n, ref in sorted(tree.files.items())
                 if PurePosixPath(n).suffix.lower() in (".tif", ".tiff", ".png")}
    categories: dict[int, dict] = {}
    tasks, seen, skipped = [], {}, []
    for path in files:
        doc = load_coco(path, path.read_bytes(), report)
        for cat in doc["categories"]:
            categories.setdefault(cat["id"], {"id": cat["id"], "name": cat.get("name", "cell"),
                                              "supercategory": cat.get("supercategory", "cell")})
        image_ids = {img["id"]: img for img in doc["images"]}
        by_image: dict[int, list[dict]] = {i: [] for i in image_ids}
        ann_ids: set[int] = set()
        for ann in sorted(doc["annotations"], key=lambda a: a["id"]):
            if ann["id"] in ann_ids:
                report.problem(str(path), f"annotation {ann['id']}: duplicate id; skipped")
            elif ann["image_id"] not in image_ids:
                report.problem(str(path), f"annotation {ann['id']}: unknown image_id {ann['image_id']}; skipped")
            elif ann["category_id"] not in {c["id"] for c in doc["categories"]}:
                report.problem(str(path), f"annotation {ann['id']}: unknown category {ann['category_id']}; skipped")
            else:
                by_image[ann["image_id"]].append(ann)
                ann_ids.add(ann["id"])
                continue
            skipped.append(ImageResult(key=f"{path}#{ann['id']}", n_read=1, ok=False, is_image=False))
        for image_id, img in sorted(image_ids.items()):
            name = PurePosixPath(str(img.get("file_name", ""))).name
            if name in seen:
                report.problem(str(path), f"image {name} also listed in {seen[name]}; second copy skipped")
                continue
            seen[name] = path.name
            ref = index.get(name)
            if images and ref is None:
                report.problem(name, f"image listed in {path.name} is missing (--no-images keeps the annotations)")
                skipped.append(ImageResult(key=name, n_read=len(by_image[image_id]), ok=False))
                continue
            tasks.append(_Task(name, img, ref, by_image[image_id], split_of_name(path.name), path.name,
                               str(Path(out) / "images")))
    results = run_tasks(_convert_image, tasks, report, workers, desc=NAME)
    cats = [categories[i] for i in sorted(categories)] or [{"id": 1, "name": "cell", "supercategory": "cell"}]
    return write_coco(out, results + skipped, source=NAME, licence=LICENCE, url=URL, categories=cats, report=report,
                      fractions=parse_fractions(splits), annotation_only=not images,
                      options={"files": [p.name for p in files], "cell_type": cell_type, "images": images})
