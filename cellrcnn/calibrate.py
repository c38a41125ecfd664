"""``cellrcnn calibrate CKPT ANNOTATIONS.json``: choose a trained model's decision thresholds on
annotated images and write a checkpoint that carries them.

    cellrcnn calibrate CKPT ANNOTATIONS.json [MORE.json ...] [--images DIR] [--limit 48]
                       [--modality H&E] [--out CALIBRATED.ckpt]
    python -m cellrcnn.calibrate ...          (the same)

Each image runs through the network once, every threshold combination of the model's grid is
decided from the same outputs, and the combination with the best mean DSB score wins
(:mod:`cellrcnn.evaluation.calibrate`). Use annotated images that are *not* the test split
(e.g. part of the training set), and like the images the model will be given: ``--modality``
keeps only images of one appearance (fluorescence, brightfield, H&E), e.g. the stained tissue
that ``model=auto`` sends to ``nuclei_he``. The written checkpoint (``--out``, default
``<ckpt>.calibrated.ckpt``) holds the chosen values in its hyper-parameters, so ``cellrcnn
predict`` and ``cellrcnn evaluate`` use them.

Examples:
    cellrcnn calibrate outputs/run/checkpoints/last.ckpt datasets/coco/mine/annotations/val.json
    cellrcnn calibrate nuclei_he.ckpt datasets/coco/monuseg/annotations/val.json \
        datasets/coco/bbbc038/annotations/val.json --modality "H&E"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data.appearance import MODALITIES
from .evaluation.calibrate import CalibrationSamples, calibrate, write_calibrated


def main(argv: list[str] | None = None) -> int:
    from .modules.base import load_module

    p = argparse.ArgumentParser(prog="cellrcnn calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path, help="a cellrcnn checkpoint")
    p.add_argument("annotations", type=Path, nargs="+",
                   help="COCO annotation file(s) of the calibration images (not the test split)")
    p.add_argument("--images", type=Path, default=None,
                   help="image folder of a single annotation file (default: ../images next to each file)")
    p.add_argument("--limit", type=int, default=48, help="images used, spread over the files (default 48)")
    p.add_argument("--modality", choices=MODALITIES, default=None,
                   help="calibrate only on images of this appearance (default: all)")
    p.add_argument("--out", type=Path, default=None, help="calibrated checkpoint (default <ckpt>.calibrated.ckpt)")
    args = p.parse_args(argv)
    for path, what in ((args.ckpt, "checkpoint"), *((a, "annotation file") for a in args.annotations)):
        if not path.is_file():
            print(f"cellrcnn calibrate: error: {path}: no such {what}", file=sys.stderr)
            return 2
    if args.images is not None and len(args.annotations) > 1:
        print("cellrcnn calibrate: error: --images names the folder of a single annotation file; "
              "give each file its ../images folder instead", file=sys.stderr)
        return 2
    module = load_module(args.ckpt)
    annotations = [a.resolve() for a in args.annotations]
    samples = CalibrationSamples(annotations, args.images, args.limit, modality=args.modality,
                                 **module.input_settings)
    if not len(samples):
        which = f" of modality {args.modality}" if args.modality else ""
        print(f"cellrcnn calibrate: error: {', '.join(map(str, args.annotations))}: no images{which} "
              "to calibrate on", file=sys.stderr)
        return 2
    update, report = calibrate(module, samples)
    out = args.out or args.ckpt.with_suffix(".calibrated.ckpt")
    write_calibrated(args.ckpt, update, report, out)
    print(json.dumps({k: v for k, v in report.items() if k != "grid"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
