"""Command line for the dataset converters.

    python -m cellrcnn.data.convert list
    python -m cellrcnn.data.convert SOURCE --src PATH --out DIR [--splits 80,10,10] [--strict] [--workers N]
    python -m cellrcnn.data.convert validate DIR
    python -m cellrcnn.data.convert merge OUT DIR [DIR ...]
    python -m cellrcnn.data.convert stats DIR [--json FILE]
    python -m cellrcnn.data.convert download SOURCE --out DIR

Every conversion prints ``N images, M instances read; K written``, the split sizes and the
files it skipped (``--strict`` stops at the first). Exit status: 0 done, 1 error or invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module
from pathlib import Path

from cellrcnn.data.converters import SOURCES


def _flag(p, name: str, help: str) -> None:
    p.add_argument(name, action="store_true", help=help)


def _outline_options(p) -> None:
    p.add_argument("--min-area", type=int, default=16, help="drop interiors under this many px (stroke gaps)")
    _flag(p, "--dilate", "grow each instance by 1 px into its outline")


EXTRA_OPTIONS = {
    "bbbc038": lambda p: (p.add_argument("--labels", nargs="+", type=Path, help="RLE CSV(s): masks from the CSV "
                                         "(stage1_train_labels.csv, stage1_solution.csv, stage2_solution_final.csv)"),
                          _flag(p, "--no-images", "annotations only, sizes from the CSV's Height/Width")),
    "bbbc039": lambda p: p.add_argument("--connectivity", type=int, choices=(4, 8), default=8,
                                        help="components within each colour (8 as in the authors' example)"),
    "bbbc007": _outline_options,
    "bbbc009": _outline_options,
    "bbbc018": lambda p: (_outline_options(p), _flag(p, "--flip-outlines", "mirror outlines vertically")),
    "cho": _outline_options,
    "bbbc041": lambda p: (_flag(p, "--no-images", "boxes only, sizes from the JSON (no image files needed)"),
                          p.add_argument("--difficult", choices=("keep", "drop"), default="keep",
                                         help="'difficult' boxes: own category (keep) or removed (drop)")),
    "sartorius": lambda p: _flag(p, "--no-images", "annotations only, sizes from train.csv"),
    "livecell": lambda p: (_flag(p, "--no-images", "annotations only"),
                           p.add_argument("--images-dir", type=Path, help="where the images are, if not under --src"),
                           p.add_argument("--cell-type", help="per-type files, e.g. a172, shsy5y")),
    "membrane": lambda p: (p.add_argument("--min-area", type=int, default=0, help="drop components under N px"),
                           _flag(p, "--dilate", "grow each cell by 1 px into the membrane")),
    "folder": lambda p: (p.add_argument("--mask-suffix", default="_masks", help="Cellpose label suffix"),
                         p.add_argument("--img-filter", default="", help="Cellpose image suffix, e.g. _img"),
                         p.add_argument("--name", default="folder", help="source name written to info.source"),
                         p.add_argument("--licence", default="unspecified", help="licence written to info.licence"),
                         _flag(p, "--allow-pickle", "read Cellpose _seg.npy files (pickles run code: only files "
                                                    "you trust)")),
    "monuseg": lambda p: (p.add_argument("--images", type=Path, help="folder or zip holding the images (.tif, or the "
                                         "<id>/images/<id>.png layout) when --src has only the XML annotations"),
                          p.add_argument("--prefer", choices=("xml", "png"), default="xml",
                                         help="annotation used where an image has both an XML and PNG masks")),
    "sbsst265": lambda p: None,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellrcnn convert",
                                     description="Convert public cell/nuclei datasets to COCO, and check, merge, "
                                                 "describe or download them.",
                                     epilog="examples:\n"
                                            "  cellrcnn convert bbbc038 --src stage1_train.zip --out datasets/coco/bbbc038\n"
                                            "  cellrcnn convert folder --src my_images/ --out datasets/coco/mine\n"
                                            "  cellrcnn convert SOURCE --help     (the options of one source)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the sources, their licences and URLs")
    for name, (module, text) in SOURCES.items():
        p = sub.add_parser(name, help=text, description=import_module(module).__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--src", required=name != "bbbc038", type=Path, help="source folder, zip or file")
        p.add_argument("--out", required=True, type=Path, help="output folder (images/ + annotations/)")
        p.add_argument("--splits", default=None, help="train,val,test shares where no official split (80,10,10)")
        _flag(p, "--strict", "stop at the first bad or missing file")
        _flag(p, "--force", "write into a non-empty --out that is not an earlier conversion (its files are kept)")
        p.add_argument("--workers", type=int, default=None, help="processes (default: available cores, max 8)")
        EXTRA_OPTIONS[name](p)
    p = sub.add_parser("validate", help="check a converted folder")
    p.add_argument("dir", type=Path)
    _flag(p, "--no-images", "skip reading the image files")
    p = sub.add_parser("merge", help="merge converted folders into one")
    p.add_argument("out", type=Path)
    p.add_argument("dirs", type=Path, nargs="+")
    _flag(p, "--force", "write into a non-empty folder that is not an earlier output (its files are kept)")
    p = sub.add_parser("stats", help="counts, object sizes and suggested anchors")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p = sub.add_parser("download", help="fetch the official files (checksums verified where known)")
    p.add_argument("source")
    p.add_argument("--out", required=True, type=Path)
    return parser


def _convert(args) -> int:
    module = import_module(SOURCES[args.command][0])
    from cellrcnn.data.converters import staging
    from cellrcnn.data.converters.common import check_output_folder

    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "src", "out", "force")}
    if "no_images" in kwargs:
        kwargs["images"] = not kwargs.pop("no_images")
    if args.src is not None and args.out.resolve() in (args.src.resolve(), *args.src.resolve().parents):
        raise ValueError(f"--out {args.out} must not contain --src {args.src} (old outputs are cleaned up)")
    check_output_folder(args.out, args.force)
    stage = staging.begin(args.out)  # written beside --out, swapped in when complete
    try:
        module.convert(args.src, stage, **kwargs)
        report = stage / "conversion.json"
        summary = json.loads(report.read_text()) if report.is_file() else {}
        if summary.get("images_read") and not summary.get("images_written"):
            staging.discard(stage)  # an earlier good conversion in --out is kept
            print(f"error: none of the {summary['images_read']} source images could be converted (see above); "
                  f"{args.out} left as it was", file=sys.stderr)
            return 1
    except BaseException:
        staging.discard(stage)
        raise
    staging.commit(stage, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cellrcnn.data.converters.common import ConversionError
    from cellrcnn.data.converters.download import DownloadError

    try:
        if args.command == "list":
            for name, (module, text) in SOURCES.items():
                mod = import_module(module)
                print(f"{name:10s} {text}\n{'':10s} licence: {getattr(mod, 'LICENCE', 'set with --licence')}; "
                      f"{getattr(mod, 'URL', '')}")
            return 0
        if args.command == "validate":
            from cellrcnn.data.converters.validate import validate

            problems = validate(args.dir, check_images=not args.no_images)
            for line in problems:
                print(line)
            print(f"{args.dir}: " + ("valid" if not problems else f"{len(problems)} problem(s)"))
            return 1 if problems else 0
        if args.command == "merge":
            from cellrcnn.data.converters.tools import merge

            merge(args.out, args.dirs, force=args.force)
            return 0
        if args.command == "stats":
            from cellrcnn.data.converters.tools import format_stats, stats

            result = stats(args.dir)
            print(format_stats(result))
            if args.json:
                args.json.write_text(json.dumps(result, indent=1) + "\n")
            return 0
        if args.command == "download":
            from cellrcnn.data.converters.download import download

            download(args.source, args.out)
            return 0
        return _convert(args)
    except (ConversionError, DownloadError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
