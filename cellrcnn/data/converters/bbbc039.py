"""BBBC039 (U2OS nuclei, Hoechst) -> COCO.

Source (DATASETS.md §5): a folder holding ``images.zip``, ``masks.zip`` and ``metadata.zip``
(read in place) or their extracted folders: ``images/<stem>.tif`` (16-bit), ``masks/<stem>.png``
and ``metadata/{training,validation,test}.txt``.

The mask's red channel is a graph colouring (values 0–3, touching nuclei differ), not instance
ids: instances are the connected components *within each colour* (8-connected by default, as in
the authors' decoding example; ``label(R > 0)`` would merge every touching pair). Images are
copied byte for byte. Splits are the official split files, matched on the file stem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cellrcnn.data.converters.common import (
    ConversionError,
    ImageResult,
    Report,
    parse_fractions,
    run_tasks,
    write_bytes,
    write_coco,
)
from cellrcnn.data.converters.instances import colour_instances, decode_image, drop_alpha, label_annotations
from cellrcnn.data.converters.sourcefs import Ref, SourceTree, read_ref, ref_name

NAME = "bbbc039"
LICENCE = "CC0 1.0"
URL = "https://bbbc.broadinstitute.org/BBBC039"
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
SPLIT_FILES = {"training.txt": "train", "validation.txt": "val", "test.txt": "test"}


@dataclass
class _Task:
    stem: str
    image: Ref
    mask: Ref | None
    split: str | None
    connectivity: int
    out_images: str


def _convert_image(task: _Task) -> ImageResult:
    res = ImageResult(key=task.stem, split=task.split)
    res.file_name = task.stem + PurePosixPath(task.image[1]).suffix.lower()
    with res.guard(ref_name(task.image)):
        data = read_ref(task.image)
        res.height, res.width = (int(v) for v in decode_image(data, task.image[1]).shape[:2])
        write_bytes(Path(task.out_images) / res.file_name, data)
    if not res.ok:
        return res
    if task.mask is None:
        res.problems.append((f"masks/{task.stem}.png", "missing mask; image skipped"))
        res.ok = False
        return res
    with res.guard(ref_name(task.mask)):
        colours = drop_alpha(decode_image(read_ref(task.mask), task.mask[1]))
        colours = colours[..., 0] if colours.ndim == 3 else colours  # red channel holds the colouring
        if colours.shape != (res.height, res.width):
            raise ValueError(f"mask is {colours.shape} but the image is {(res.height, res.width)} (H×W)")
        res.annotations = label_annotations(colour_instances(colours, task.connectivity))
        res.n_read = len(res.annotations)  # the source count is the number of components found
    return res


def read_splits(tree: SourceTree, report: Report) -> dict[str, str]:
    """Image stem -> official split, from ``metadata/*.txt`` (lines with or without extension)."""
    split_of: dict[str, str] = {}
    for name in sorted(tree.files):
        split = SPLIT_FILES.get(PurePosixPath(name).name)
        if split is None:
            continue
        for line in tree.read(name).decode("utf-8", "replace").splitlines():
            if line.strip():
                stem = PurePosixPath(line.strip()).stem
                if split_of.get(stem, split) != split:
                    report.problem(name, f"{stem} is listed in two splits ({split_of[stem]}, {split})")
                split_of[stem] = split
    return split_of


def convert(src: str | Path, out: str | Path, *, connectivity: int = 8, splits: str | None = None,
            strict: bool = False, workers: int | None = None) -> Path:
    """Convert the BBBC039 folder (or folder of its zips) ``src`` into COCO under ``out``."""
    report = Report(strict=strict)
    tree = SourceTree(src)
    images = {PurePosixPath(n).stem: n for n in tree.files
              if PurePosixPath(n).parent.name == "images" and PurePosixPath(n).suffix.lower() in (".tif", ".tiff")}
    masks = {PurePosixPath(n).stem: n for n in tree.files
             if PurePosixPath(n).parent.name == "masks" and PurePosixPath(n).suffix.lower() == ".png"}
    if not images:
        raise ConversionError(f"{src}: no images/*.tif (or images.zip) found")
    split_of = read_splits(tree, report)
    if not split_of:
        print(f"bbbc039: no metadata/*.txt split files in {src}; splitting by hash of the file name")
    else:
        unlisted = sorted(set(images) - set(split_of))
        for stem in unlisted:
            report.problem(images[stem], "not listed in any official split file; split by hash")
    for stem in sorted(set(masks) - set(images)):
        report.problem(masks[stem], "mask without an image; skipped")
    out_images = str(Path(out) / "images")
    tasks = [_Task(stem, tree.files[images[stem]], tree.files.get(masks.get(stem, "")), split_of.get(stem),
                   connectivity, out_images) for stem in sorted(images)]
    results = run_tasks(_convert_image, tasks, report, workers, desc=NAME)
    fractions = parse_fractions(splits)
    return write_coco(out, results, source=NAME, licence=LICENCE, url=URL, categories=CATEGORIES, report=report,
                      fractions=fractions, options={"connectivity": connectivity, "official_splits": bool(split_of)})
