"""CHO cells with outline annotation (BBBC030, 60 DIC images) and the generic
"image + outline image" format -> filled COCO instances.

Source (DATASETS.md §10): ``images/<stem>.<ext>`` with ``ground_truth/<stem>.<ext>`` (the
public copy) or ``outlines/<stem>.<ext>`` (generic), same size, closed 1-px contours in either
polarity. RGB images with equal channels are stored as grey PNG.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from cellrcnn.data.converters.common import ConversionError, Report
from cellrcnn.data.converters.outlines import IMAGE_SUFFIXES, Pair, convert_pairs
from cellrcnn.data.converters.sourcefs import SourceTree, ref_name

NAME = "cho"
LICENCE = "unspecified (BBBC030; see the BBBC page)"
URL = "https://bbbc.broadinstitute.org/BBBC030"
CATEGORIES = [{"id": 1, "name": "cell", "supercategory": "cell"}]
OUTLINE_DIRS = ("ground_truth", "outlines")


def convert(src: str | Path, out: str | Path, *, min_area: int = 16, dilate: bool = False,
            splits: str | None = None, strict: bool = False, workers: int | None = None) -> Path:
    """Convert a folder with ``images/`` and ``ground_truth/`` (or ``outlines/``) into COCO under ``out``."""
    report = Report(strict=strict)
    tree = SourceTree(src)
    outlines = {}
    for name in tree.files:
        path = PurePosixPath(name)
        if path.parent.name in OUTLINE_DIRS and path.suffix.lower() in IMAGE_SUFFIXES:
            outlines[(str(path.parent.parent), path.stem)] = name
    pairs = []
    for name in sorted(tree.files):
        path = PurePosixPath(name)
        if path.parent.name != "images" or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        outline = outlines.get((str(path.parent.parent), path.stem))
        if outline is None:
            report.problem(ref_name(tree.files[name]), "no outline with the same name in ground_truth/ or outlines/")
            continue
        pairs.append(Pair(path.name, path.name, tree.files[name], tree.files[outline], 1))
    if not pairs:
        raise ConversionError(f"{src}: no images/ with matching ground_truth/ or outlines/ found")
    return convert_pairs(pairs, out, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                         min_area=min_area, dilate=dilate, splits=splits, workers=workers)
