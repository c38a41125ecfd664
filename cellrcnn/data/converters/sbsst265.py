"""S-BSST265 (Kromp et al. 2020, fluorescence nuclei) -> COCO.

Source (DATASETS.md §13): the BioStudies zip read in place, or its extracted folder:
``rawimages/<name>.tif`` (8-bit grey, or RGB holding one grey in three channels; some
LZW-compressed), ``groundtruth/<name>.tif`` (uint16 label image, same size) and
``image_description.csv`` (``;``-separated, latin-1, decimal commas). Each non-zero label value
is one nucleus. Grey-in-RGB images are written as one-channel PNGs (lossless), the others are
copied byte for byte.

Each image record carries the CSV's acquisition metadata in snake_case (``diagnosis``,
``preparation``, ``magnification``, ``modality``, ``device``, ``software``, ``mean_bg_signal``,
``mean_fg_signal``, ``signal_to_noise``, ``snr_class``, ``testset_class``, ``official_split``);
numeric columns are numbers. Images listed in the CSV but absent from the source are named in
the output and in ``conversion.json`` (options.absent_listed); they do not stop the conversion.

Splits: the official train/test split from the CSV. The published train set alone (42 images)
has no held-out images, so when no official test image is present, validation and test images
are carved from the train images by hash; official test images, when present, go to ``test``
and only validation images are carved from train.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
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
from cellrcnn.data.converters.instances import decode_image, grey_png_if_equal, label_annotations
from cellrcnn.data.converters.sourcefs import Ref, SourceTree, read_ref, ref_name

NAME = "sbsst265"
LICENCE = "CC0 1.0"
URL = "https://www.ebi.ac.uk/biostudies/studies/S-BSST265"
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
TIFF_SUFFIXES = (".tif", ".tiff")

# CSV column -> image record key; columns not listed here get a generic snake_case name
COLUMNS = {
    "Image_Name": "source_id",
    "Diagnosis": "diagnosis",
    "Preparation": "preparation",
    "Train-/Testset split": "official_split",
    "Testset class": "testset_class",
    "Magnification": "magnification",
    "Modality": "modality",
    "Device": "device",
    "Software": "software",
    "Mean BG signal": "mean_bg_signal",
    "Mean FG signal": "mean_fg_signal",
    "Signal/Noise": "signal_to_noise",
    "S/N Class": "snr_class",
}
# "FM" is widefield fluorescence; the test set adds laser-scanning confocal ("LSM") images
MODALITIES = {"FM": "fluorescence", "LSM": "confocal fluorescence"}
_NUMBER = re.compile(r"^-?\d+(?:[.,]\d+)?$")


@dataclass
class _Task:
    stem: str
    image: Ref
    labels: Ref | None
    split: str | None
    extra: dict = field(default_factory=dict)
    out_images: str = ""


def snake_case(column: str) -> str:
    """``"Mean BG signal"`` -> ``"mean_bg_signal"`` (for columns not named in :data:`COLUMNS`)."""
    return re.sub(r"[^0-9a-z]+", "_", column.strip().lower()).strip("_")


def parse_value(column: str, text: str) -> str | float | None:
    """One CSV cell -> record value: decimal-comma numbers as floats, ``-``/empty as None."""
    text = text.strip()
    if text in ("", "-"):
        return None
    if _NUMBER.match(text):
        return float(text.replace(",", "."))
    if column == "Modality":
        return MODALITIES.get(text, text)
    return text


def read_description(data: bytes) -> dict[str, dict]:
    """``image_description.csv`` bytes -> image name -> record fields (None values left out)."""
    bom = data.startswith(b"\xef\xbb\xbf")  # a copy re-saved by a spreadsheet as UTF-8
    text = data[3:].decode("utf-8", "replace") if bom else data.decode("latin-1")
    rows = csv.DictReader(io.StringIO(text), delimiter=";")
    if "Image_Name" not in (rows.fieldnames or []):
        raise ConversionError(f"image_description.csv: no Image_Name column; found {rows.fieldnames}")
    table: dict[str, dict] = {}
    for row in rows:
        name = (row.get("Image_Name") or "").strip()
        if not name:
            continue
        record = {}
        for column, text in row.items():
            if column is None or column == "Image_Name":
                continue
            value = parse_value(column, text or "")
            if value is not None:
                record[COLUMNS.get(column, snake_case(column))] = value
        if "official_split" in record:
            record["official_split"] = str(record["official_split"]).lower()
        table[PurePosixPath(name).stem] = record
    return table


def _convert_image(task: _Task) -> ImageResult:
    res = ImageResult(key=task.stem, split=task.split, extra={"source_id": task.stem, **task.extra})
    with res.guard(ref_name(task.image)):
        data = read_ref(task.image)
        arr = decode_image(data, task.image[1])
        res.height, res.width = (int(v) for v in arr.shape[:2])
        grey = grey_png_if_equal(arr)  # the tissue images hold one grey in R, G and B
        res.file_name = task.stem + (".png" if grey else PurePosixPath(task.image[1]).suffix.lower())
        write_bytes(Path(task.out_images) / res.file_name, grey or data)
    if not res.ok:
        return res
    if task.labels is None:
        res.problems.append((f"groundtruth/{task.stem}.tif", "missing label image; image skipped"))
        res.ok = False
        return res
    with res.guard(ref_name(task.labels)):
        labels = np.asarray(decode_image(read_ref(task.labels), task.labels[1]))
        if labels.ndim != 2 or labels.dtype.kind not in "iu":
            raise ValueError(f"not a 2-D integer label image (shape {labels.shape}, dtype {labels.dtype})")
        if labels.shape != (res.height, res.width):
            raise ValueError(f"labels are {labels.shape} but the image is {(res.height, res.width)} (H×W)")
        res.n_read = int(np.count_nonzero(np.unique(labels)))
        res.annotations = label_annotations(labels)
    return res


def _by_stem(tree: SourceTree, folder: str) -> dict[str, str]:
    return {PurePosixPath(n).stem: n for n in sorted(tree.files)
            if PurePosixPath(n).parent.name == folder and PurePosixPath(n).suffix.lower() in TIFF_SUFFIXES}


def convert(src: str | Path, out: str | Path, *, splits: str | None = None, strict: bool = False,
            workers: int | None = None) -> Path:
    """Convert the S-BSST265 zip or folder ``src`` into COCO under ``out``."""
    report = Report(strict=strict)
    tree = SourceTree(src)
    images, labels = _by_stem(tree, "rawimages"), _by_stem(tree, "groundtruth")
    if not images:
        raise ConversionError(f"{src}: no rawimages/*.tif found (expected the S-BSST265 layout)")
    csv_name = tree.find("image_description.csv")
    table = read_description(tree.read(csv_name)) if csv_name else {}
    if not table:
        print(f"{NAME}: no image_description.csv in {src}; no metadata, splitting by hash of the name")
    absent = sorted(set(table) - set(images))
    if absent:
        print(f"{NAME}: {len(absent)} image(s) listed in image_description.csv are absent from {src}: "
              + ", ".join(absent))
    for stem in sorted(set(images) - set(table)):
        if table:
            report.problem(images[stem], "not listed in image_description.csv; split by hash")
    for stem in sorted(set(labels) - set(images)):
        report.problem(labels[stem], "label image without a raw image; skipped")
    official = {stem: table.get(stem, {}).get("official_split") for stem in images}
    has_test = "test" in official.values()

    def split_of(stem: str) -> str | None:
        # without official test images, the train images are the whole pool: val and test carved by hash
        if official[stem] == "test":
            return "test"
        return "train" if official[stem] == "train" and has_test else None

    out_images = str(Path(out) / "images")
    tasks = [_Task(stem, tree.files[images[stem]], tree.files.get(labels.get(stem, "")), split_of(stem),
                   table.get(stem, {}), out_images) for stem in sorted(images)]
    results = run_tasks(_convert_image, tasks, report, workers, desc=NAME)
    options = {"official_test_present": has_test, "absent_listed": absent, "splits": list(parse_fractions(splits))}
    return write_coco(out, results, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                      fractions=parse_fractions(splits), options=options, carve_val=True)
