"""MoNuSeg 2018 (H&E nuclei, TCGA, 40x) -> COCO.

Sources (DATASETS.md §12), a folder or zip, any depth, in any mix of:
- the official layout: ``Tissue Images/<TCGA-id>.tif`` + ``Annotations/<TCGA-id>.xml``, or
  ``.tif`` and ``.xml`` side by side (as the test set is published);
- the per-nucleus PNG layout: ``<TCGA-id>/images/<TCGA-id>.png`` + ``<TCGA-id>/masks/*.png``
  (one binary PNG per nucleus).
``images=`` (``--images``) names another folder or zip to take the images from, e.g. the
PNG-layout zip when ``src`` holds only the XML annotations: the XML gives no image size.

XML (Aperio ImageScope): one ``Region`` per nucleus, ``Vertex X= Y=`` float coordinates
(X = column, Y = row). Each polygon is rasterised on its own (pixels whose centre lies inside),
so overlapping regions stay separate instances. The coordinates are 1-based, as in the
organisers' MATLAB ``poly2mask`` masks: shifting by -1 px reproduces the published per-nucleus
PNG masks (mean best IoU 0.970 per nucleus over the 13 shared XMLs), 0 and -0.5 px do not
(0.839, 0.916).
When an image has both an XML and PNG masks, ``prefer`` chooses (``xml`` by default, the
original annotation). Images are copied byte for byte.

Splits: the training set has no official train/val split; images are split by hash of the
TCGA id. Images under a folder named ``MoNuSegTestData`` (or ``test``, ``Test Set``) are the
official test set: they go to ``test`` and validation images are carved from the rest.
Licence CC BY-NC-SA 4.0 (non-commercial).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from skimage.draw import polygon as fill_polygon

from cellrcnn.data.converters.bbbc038 import find_images
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

NAME = "monuseg"
LICENCE = "CC BY-NC-SA 4.0"
URL = "https://monuseg.grand-challenge.org/Data/"
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
IMAGE_RECORD = {"stain": "H&E", "modality": "brightfield", "magnification": "40x"}
TIFF_SUFFIXES = (".tif", ".tiff")
XML_ORIGIN = 1.0  # XML vertex coordinates are 1-based (MATLAB): pixel index = coordinate - 1


@dataclass
class _Task:
    image_id: str
    image: Ref | None
    xml: Ref | None
    masks: list[Ref] = field(default_factory=list)
    split: str | None = None
    out_images: str = ""


def parse_regions(data: bytes) -> tuple[list[np.ndarray], float | None]:
    """ImageScope XML bytes -> (one float K×2 array of (x, y) vertices per ``Region``, µm per
    pixel or None). ``RegionAttributeHeaders`` blocks are not regions and are not returned."""
    root = ET.fromstring(data)
    polygons = [np.array([[float(v.get("X", "nan")), float(v.get("Y", "nan"))] for v in region.iter("Vertex")],
                         np.float64).reshape(-1, 2) for region in root.iter("Region")]
    mpp = root.get("MicronsPerPixel")
    try:
        microns = float(mpp) if mpp else None
    except ValueError:
        microns = None
    return polygons, microns


def rasterise(vertices: np.ndarray, height: int, width: int, origin: float = XML_ORIGIN) -> np.ndarray:
    """K×2 (x, y) polygon in source coordinates -> bool H×W mask of the pixels whose centre is
    inside (the closing edge is implied). Parts outside the image are clipped."""
    rows, cols = fill_polygon(vertices[:, 1] - origin, vertices[:, 0] - origin, (height, width))
    mask = np.zeros((height, width), bool)
    mask[rows, cols] = True
    return mask


def xml_annotations(res: ImageResult, polygons: list[np.ndarray]) -> None:
    """Rasterise every region into ``res.annotations``; degenerate ones are counted as dropped."""
    for vertices in polygons:
        if len(vertices) < 3 or not np.isfinite(vertices).all():
            res.drop("regions with under 3 valid vertices")
            continue
        ann = mask_annotation(rasterise(vertices, res.height, res.width), 1)
        if ann is None:
            res.drop("regions covering no pixel centre")
        else:
            res.annotations.append(ann)


def _convert_image(task: _Task) -> ImageResult:
    res = ImageResult(key=task.image_id, split=task.split, extra={"source_id": task.image_id, **IMAGE_RECORD})
    polygons: list[np.ndarray] = []
    if task.xml is not None:
        with res.guard(ref_name(task.xml)):
            polygons, microns = parse_regions(read_ref(task.xml))
            res.n_read = len(polygons)
            res.extra["annotation"] = "xml"
            if microns:
                res.extra["microns_per_pixel"] = microns
        if not res.ok:
            return res
    else:
        res.n_read = len(task.masks)
        res.extra["annotation"] = "png masks"
    if task.image is None:
        res.problems.append((ref_name(task.xml) if task.xml else task.image_id,
                             "no image found (the XML gives no image size): pass the images with --images"))
        res.ok = False
        return res
    res.file_name = task.image_id + PurePosixPath(task.image[1]).suffix.lower()
    with res.guard(ref_name(task.image)):
        data = read_ref(task.image)
        res.height, res.width = (int(v) for v in decode_image(data, task.image[1]).shape[:2])
        write_bytes(Path(task.out_images) / res.file_name, data)
    if not res.ok:
        return res
    if task.xml is not None:
        xml_annotations(res, polygons)
        return res
    for ref in task.masks:
        with res.guard(ref_name(ref), fatal=False):
            raw = cv2.imdecode(np.frombuffer(read_ref(ref), np.uint8), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise ValueError("cannot decode mask PNG")
            mask = raw > 0 if raw.ndim == 2 else as_binary(raw)
            if mask.shape != (res.height, res.width):
                raise ValueError(f"mask is {mask.shape} but the image is {(res.height, res.width)} (H×W)")
            ann = mask_annotation(mask, 1)
            if ann is None:
                raise ValueError("empty mask")
            res.annotations.append(ann)
    return res


def find_sources(tree: SourceTree, report: Report) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """(id -> XML path, id -> image path, id -> mask paths) in one tree, any layout."""
    xmls = {PurePosixPath(n).stem: n for n in sorted(tree.files) if n.lower().endswith(".xml")}
    images = {PurePosixPath(n).stem: n for n in sorted(tree.files)
              if PurePosixPath(n).suffix.lower() in TIFF_SUFFIXES and PurePosixPath(n).parent.name != "masks"}
    masks = {}
    for image_id, (image, mask_names) in find_images(tree, report).items():
        if image:
            images.setdefault(image_id, image)  # an original TIFF wins over its PNG copy
        if mask_names:
            masks[image_id] = mask_names
    return xmls, images, masks


def _is_official_test(path: str) -> bool:
    """Below a ``MoNuSegTestData``/``test``/``Test Set`` folder (not e.g. ``latest``)."""
    names = [part.lower().replace("_", "").replace("-", "").replace(" ", "") for part in PurePosixPath(path).parts[:-1]]
    return any(n in ("test", "testing", "testset") or "testdata" in n for n in names)


def convert(src: str | Path, out: str | Path, *, images: str | Path | None = None, prefer: str = "xml",
            splits: str | None = None, strict: bool = False, workers: int | None = None) -> Path:
    """Convert MoNuSeg ``src`` (XML and/or per-nucleus PNG masks; images from ``src`` or
    ``images``) into COCO under ``out``. ``prefer``: ``xml`` or ``png`` where an image has both."""
    if prefer not in ("xml", "png"):
        raise ValueError(f"prefer must be 'xml' or 'png', got {prefer!r}")
    report = Report(strict=strict)
    tree = SourceTree(src)
    xmls, found_images, masks = find_sources(tree, report)
    refs = {i: tree.files[n] for i, n in found_images.items()}
    for image_id in sorted(set(found_images) - set(xmls) - set(masks)):
        report.problem(ref_name(refs[image_id]), "image without annotation (no XML, no masks/); skipped")
    if images is not None:
        extra_tree = SourceTree(images)
        _, more_images, _ = find_sources(extra_tree, Report())
        for image_id, name in more_images.items():
            refs.setdefault(image_id, extra_tree.files[name])
            found_images.setdefault(image_id, name)
    annotated = sorted(set(xmls) | set(masks))
    if not annotated:
        raise ConversionError(f"{src}: no MoNuSeg annotations found (*.xml, or <id>/masks/*.png)")
    if not any(i in refs for i in annotated):
        raise ConversionError(f"{src}: {len(annotated)} annotated images but none of the images (the XML gives no "
                              "image size): pass the images with --images (a folder of .tif, or the PNG-layout zip)")
    paths = {i: xmls.get(i) or found_images.get(i) or masks[i][0] for i in annotated}
    has_test = any(_is_official_test(p) for p in paths.values())

    def split_of(image_id: str) -> str | None:
        if _is_official_test(paths[image_id]):
            return "test"
        return "train" if has_test else None  # no official test set here: val and test by hash

    out_images = str(Path(out) / "images")
    tasks = []
    for image_id in annotated:
        use_xml = image_id in xmls and (prefer == "xml" or image_id not in masks)
        tasks.append(_Task(image_id, refs.get(image_id), tree.files[xmls[image_id]] if use_xml else None,
                           [] if use_xml else [tree.files[m] for m in masks[image_id]], split_of(image_id),
                           out_images))
    results = run_tasks(_convert_image, tasks, report, workers, desc=NAME)
    options = {"prefer": prefer, "xml_origin": XML_ORIGIN, "official_test_present": has_test,
               "splits": list(parse_fractions(splits))}
    return write_coco(out, results, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                      fractions=parse_fractions(splits), options=options, carve_val=True)
