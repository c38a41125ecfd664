"""BBBC007 (Drosophila Kc167, DNA + actin) outline annotations -> filled COCO instances.

Source (DATASETS.md §2): ``BBBC007_v1_images.zip`` and ``BBBC007_v1_outlines.zip`` (read in
place) or their folders; each image ``BBBC007_v1_images/<group>/<file>.tif`` has its outline at
the same path under ``BBBC007_v1_outlines/``. Outlines of a DNA image are nuclei, of an actin
image cells; the channel is read from the three naming schemes (``…d.tif``/``…f.tif``,
``_D_``/``_F_``, ``…d0``/``…d1``). The five RGB images with equal channels are stored as grey PNG.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from cellrcnn.data.converters.common import ConversionError, Report
from cellrcnn.data.converters.outlines import Pair, convert_pairs, pair_by_folder
from cellrcnn.data.converters.sourcefs import SourceTree, ref_name

NAME = "bbbc007"
LICENCE = "CC0 1.0"
URL = "https://bbbc.broadinstitute.org/BBBC007"
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}, {"id": 2, "name": "cell", "supercategory": "cell"}]


def channel_category(stem: str) -> int | None:
    """1 (nucleus) for a DNA image, 2 (cell) for an actin image, None when the name is unknown."""
    if re.search(r"d0$", stem):
        return 1
    if re.search(r"d1$", stem):
        return 2
    if "_D_" in stem:
        return 1
    if "_F_" in stem:
        return 2
    if stem.endswith("d"):
        return 1
    if stem.endswith("f"):
        return 2
    return None


def convert(src: str | Path, out: str | Path, *, min_area: int = 16, dilate: bool = False,
            splits: str | None = None, strict: bool = False, workers: int | None = None) -> Path:
    """Convert the BBBC007 folder (or folder of its two zips) ``src`` into COCO under ``out``."""
    report = Report(strict=strict)
    tree = SourceTree(src)
    pairs = []
    for key, rel, image, outline in pair_by_folder(tree.files, "BBBC007_v1_images", "BBBC007_v1_outlines", report):
        category = channel_category(PurePosixPath(rel).stem)
        if category is None:
            report.problem(ref_name(image), "cannot tell DNA from actin by the file name; skipped")
            continue
        pairs.append(Pair(key, rel, image, outline, category))
    if not pairs:
        raise ConversionError(f"{src}: no BBBC007_v1_images/ with matching BBBC007_v1_outlines/ found")
    return convert_pairs(pairs, out, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                         min_area=min_area, dilate=dilate, splits=splits, workers=workers)
