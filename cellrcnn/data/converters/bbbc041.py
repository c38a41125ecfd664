"""BBBC041 (P. vivax malaria blood smears) boxes -> box-only COCO annotations.

Source (DATASETS.md §6): ``malaria.zip`` (read in place) or its folder ``malaria/`` with
``training.json``, ``test.json`` and ``images/``; or a single JSON file. Each JSON entry gives
``image.pathname`` ("/images/<uuid>.png", leading slash stripped), ``image.shape`` (r = rows,
c = columns) and ``objects`` with ``bounding_box`` {minimum, maximum} {r, c} and ``category``.
COCO bbox = [min.c, min.r, max.c - min.c, max.r - min.r] (whether ``maximum`` is inclusive is
not documented upstream; the extent is kept as written). Annotations carry no ``segmentation``.

Categories keep their names with fixed ids; ``difficult`` (not a cell class) is mapped
explicitly: ``difficult="keep"`` (own category, default) or ``"drop"`` (counted as dropped).
Unknown names get ids after the known ones, in sorted order.

Images: copied when present. ``images=False`` converts the annotations alone (width and height
from the JSON), e.g. from ``test.json`` without the archive; otherwise a missing image is
reported by name and its boxes skipped. Splits: training.json -> train (val carved by hash),
test.json -> test. The JSON, not the image folder, lists the images (the folder holds extras).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from cellrcnn.data.converters.common import (
    ConversionError,
    ImageResult,
    Report,
    box_annotation,
    parse_fractions,
    write_bytes,
    write_coco,
)
from cellrcnn.data.converters.instances import decode_image
from cellrcnn.data.converters.sourcefs import SourceTree, ref_name

NAME = "bbbc041"
LICENCE = "CC BY-NC-SA 3.0"
URL = "https://bbbc.broadinstitute.org/BBBC041"
KNOWN = ["red blood cell", "trophozoite", "ring", "schizont", "gametocyte", "leukocyte", "difficult"]
SPLIT_OF_FILE = {"training.json": "train", "test.json": "test"}


def _entries(tree: SourceTree, report: Report, split_of: dict[str, str]) -> list[tuple[str, str, dict]]:
    """(json name, split, entry) for every image entry of every annotation JSON found."""
    found = []
    jsons = [n for n in sorted(tree.files) if PurePosixPath(n).name in split_of]
    if not jsons:
        raise ConversionError(f"{tree.root}: no training.json or test.json found")
    for name in jsons:
        try:
            data = json.loads(tree.read(name))
        except (ValueError, OSError) as exc:
            report.problem(ref_name(tree.files[name]), f"cannot read JSON ({exc})")
            continue
        if not isinstance(data, list):
            report.problem(ref_name(tree.files[name]), "expected a JSON list of {image, objects}")
            continue
        found += [(name, split_of[PurePosixPath(name).name], e) for e in data]
    return found


def convert(src: str | Path, out: str | Path, *, images: bool = True, difficult: str = "keep",
            splits: str | None = None, strict: bool = False, workers: int | None = None) -> Path:
    """Convert the malaria folder/zip or a single JSON ``src`` into box-only COCO under ``out``.
    (Boxes need no decoding, so this runs in one process; ``workers`` is accepted for symmetry.)"""
    if difficult not in ("keep", "drop"):
        raise ValueError(f"difficult must be 'keep' or 'drop', got {difficult!r}")
    report = Report(strict=strict)
    src = Path(src)
    split_of = dict(SPLIT_OF_FILE)
    if src.suffix.lower() == ".json":  # one JSON; its images, if any, in images/ next to it
        if not src.is_file():
            raise ConversionError(f"{src}: no such file")
        tree = SourceTree.__new__(SourceTree)
        tree.root, tree.files = src.parent, {src.name: ("", str(src))}
        if (src.parent / "images").is_dir():
            tree.files |= {f"images/{p.name}": ("", str(p)) for p in sorted((src.parent / "images").iterdir())
                           if p.is_file() and not p.name.startswith(".")}
        split_of.setdefault(src.name, "test")
    else:
        tree = SourceTree(src)
    entries = _entries(tree, report, split_of)
    names = sorted({o.get("category", "") for _, _, e in entries for o in e.get("objects", [])} - set(KNOWN))
    ordered = KNOWN + names
    if difficult == "drop":
        ordered.remove("difficult")
    cat_id = {n: i for i, n in enumerate(ordered, start=1)}
    images_by_name = {PurePosixPath(n).name: n for n in tree.files if PurePosixPath(n).parent.name == "images"}
    results = []
    for json_name, split, entry in entries:
        results.append(_convert_entry(json_name, split, entry, cat_id, images_by_name, tree, images,
                                      Path(out) / "images"))
        for name, reason in results[-1].problems:
            report.problem(name, reason)
    categories = [{"id": i, "name": n, "supercategory": "cell"} for n, i in cat_id.items()]
    options = {"difficult": difficult, "images": images, "bbox": "[min.c, min.r, max.c-min.c, max.r-min.r]"}
    return write_coco(out, results, source=NAME, licence=LICENCE, url=URL, categories=categories, report=report,
                      fractions=parse_fractions(splits), options=options, annotation_only=not images,
                      carve_val=True)


def _convert_entry(json_name, split, entry, cat_id, images_by_name, tree, images, out_images) -> ImageResult:
    image = entry.get("image", {})
    pathname = str(image.get("pathname", "")).lstrip("/")  # "/images/x.png" is relative to malaria/
    file_name = PurePosixPath(pathname).name
    objects = entry.get("objects", [])
    res = ImageResult(key=file_name, file_name=file_name, split=split, n_read=len(objects),
                      extra={"source_checksum": image.get("checksum", "")})
    where = f"{json_name}: {pathname or '(no pathname)'}"
    with res.guard(where):
        shape = image["shape"]
        res.height, res.width = int(shape["r"]), int(shape["c"])
        if not file_name:
            raise ValueError("entry without image.pathname")
    if res.ok and images:
        member = images_by_name.get(file_name)
        with res.guard(ref_name(tree.files[member]) if member else f"{tree.root}/{pathname}"):
            if member is None:
                raise FileNotFoundError("image missing (--no-images converts the boxes alone)")
            data = tree.read(member)
            h, w = decode_image(data, member).shape[:2]
            if (h, w) != (res.height, res.width):
                raise ValueError(f"image is {h}×{w} but the JSON says {res.height}×{res.width} (H×W)")
            write_bytes(out_images / file_name, data)
    if not res.ok:
        return res
    for k, obj in enumerate(objects):
        with res.guard(f"{where} object {k}", fatal=False):
            name = obj["category"]
            if name not in cat_id:
                res.drop(f"'{name}'")
                continue
            lo, hi = obj["bounding_box"]["minimum"], obj["bounding_box"]["maximum"]
            x, y, w, h = lo["c"], lo["r"], hi["c"] - lo["c"], hi["r"] - lo["r"]
            if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > res.width or y + h > res.height:
                raise ValueError(f"box {lo}–{hi} is empty or outside the {res.height}×{res.width} image")
            res.annotations.append(box_annotation(x, y, w, h, cat_id[name]))
    return res
