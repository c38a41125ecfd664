"""BBBC018 (HT29: Hoechst / pH3 / phalloidin) outline annotations -> filled COCO instances.

Source (DATASETS.md §4): ``BBBC018_v1_images/<well>-{DNA,actin,pH3}.DIB`` and
``BBBC018_v1_outlines/<well>-{nuclei,cells}.png`` (zips read in place or extracted). The DNA
image is paired with the nuclei outline (category nucleus), the actin image with the cells
outline (category cell); pH3 has no outlines and is not converted. Images are Cellomics DIB
(a header-less bitmap, stored bottom-up) and are written as PNG in top-down order; the outline
PNGs are used as they are. ``flip_outlines=True`` mirrors the outlines vertically should a copy
turn out stored upside down (one public loader flips them; check with an overlay).
Well 10779 has no annotation upstream and is noted, not treated as an error.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from cellrcnn.data.converters.common import ConversionError, Report
from cellrcnn.data.converters.outlines import Pair, convert_pairs
from cellrcnn.data.converters.sourcefs import SourceTree, ref_name

NAME = "bbbc018"
LICENCE = "unspecified (see the BBBC page; BBBC sets are commonly CC0)"
URL = "https://bbbc.broadinstitute.org/BBBC018"
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}, {"id": 2, "name": "cell", "supercategory": "cell"}]
CHANNEL_OUTLINE = {"dna": ("nuclei", 1), "actin": ("cells", 2)}
KNOWN_UNANNOTATED = {"10779"}


def convert(src: str | Path, out: str | Path, *, min_area: int = 16, dilate: bool = False,
            flip_outlines: bool = False, splits: str | None = None, strict: bool = False,
            workers: int | None = None) -> Path:
    """Convert the BBBC018 folder (or folder of its two zips) ``src`` into COCO under ``out``."""
    report = Report(strict=strict)
    tree = SourceTree(src)
    outlines = {PurePosixPath(n).stem.lower(): n for n in tree.files
                if PurePosixPath(n).parent.name.endswith("outlines")}
    pairs = []
    for name in sorted(tree.files):
        path = PurePosixPath(name)
        match = re.fullmatch(r"(\d+)-(\w+)", path.stem)
        if not path.parent.name.endswith("images") or match is None:
            continue
        well, channel = match.group(1), match.group(2).lower()
        if channel not in CHANNEL_OUTLINE:
            continue  # pH3 has no ground truth
        kind, category = CHANNEL_OUTLINE[channel]
        outline = outlines.get(f"{well}-{kind}")
        if outline is None:
            if well in KNOWN_UNANNOTATED:
                print(f"bbbc018: {name}: well {well} has no annotation upstream; not converted")
            else:
                report.problem(ref_name(tree.files[name]), f"no outline {well}-{kind}.png; image skipped")
            continue
        pairs.append(Pair(path.name, path.name, tree.files[name], tree.files[outline], category))
    if not pairs:
        raise ConversionError(f"{src}: no <well>-DNA/actin images with matching outlines found")
    return convert_pairs(pairs, out, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                         min_area=min_area, dilate=dilate, flip_outlines=flip_outlines, splits=splits,
                         workers=workers)
