"""BBBC009 (human red blood cells, DIC) outline annotations -> filled COCO instances.

Source (DATASETS.md §3): ``BBBC009_v1_images.zip`` -> ``human_rbc_dic_images/*.tif`` and
``BBBC009_v1_outlines.zip`` -> ``human_rbc_dic_outlines/*.tif`` (same names), read in place or
extracted. Outlines are 1-bit WhiteIsZero TIFFs; the minority-value rule finds the outline
whichever reader inverted it. Stroke gaps of a few px are dropped by ``min_area``.
"""

from __future__ import annotations

from pathlib import Path

from cellrcnn.data.converters.common import ConversionError, Report
from cellrcnn.data.converters.outlines import Pair, convert_pairs, pair_by_folder
from cellrcnn.data.converters.sourcefs import SourceTree

NAME = "bbbc009"
LICENCE = "unspecified (see the BBBC page; BBBC sets are commonly CC0)"
URL = "https://bbbc.broadinstitute.org/BBBC009"
CATEGORIES = [{"id": 1, "name": "cell", "supercategory": "cell"}]


def convert(src: str | Path, out: str | Path, *, min_area: int = 16, dilate: bool = False,
            splits: str | None = None, strict: bool = False, workers: int | None = None) -> Path:
    """Convert the BBBC009 folder (or folder of its two zips) ``src`` into COCO under ``out``."""
    report = Report(strict=strict)
    tree = SourceTree(src)
    pairs = [Pair(key, rel, image, outline, 1) for key, rel, image, outline
             in pair_by_folder(tree.files, "human_rbc_dic_images", "human_rbc_dic_outlines", report)]
    if not pairs:
        raise ConversionError(f"{src}: no human_rbc_dic_images/ with matching human_rbc_dic_outlines/ found")
    return convert_pairs(pairs, out, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                         min_area=min_area, dilate=dilate, splits=splits, workers=workers)
