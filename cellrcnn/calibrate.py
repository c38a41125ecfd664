"""``cellrcnn calibrate CKPT ANNOTATIONS.json``: choose a trained model's decision thresholds on
annotated images and write a checkpoint that carries them.

    cellrcnn calibrate CKPT ANNOTATIONS.json [--images DIR] [--limit 48] [--out CALIBRATED.ckpt]
    python -m cellrcnn.calibrate ...          (the same)

Each image runs through the network once, every threshold combination of the model's grid is
decided from the same outputs, and the combination with the best mean DSB score wins
(:mod:`cellrcnn.evaluation.calibrate`). Use annotated images that are *not* the test split
(e.g. part of the training set). The written checkpoint (``--out``, default
``<ckpt>.calibrated.ckpt``) holds the chosen values in its hyper-parameters, so ``cellrcnn
predict`` and ``cellrcnn evaluate`` use them.

Example:
    cellrcnn calibrate outputs/run/checkpoints/last.ckpt datasets/coco/mine/annotations/val.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .evaluation.calibrate import CalibrationSamples, calibrate, write_calibrated


def main(argv: list[str] | None = None) -> int:
    from .modules.base import load_module

    p = argparse.ArgumentParser(prog="cellrcnn calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path, help="a cellrcnn checkpoint")
    p.add_argument("annotations", type=Path, help="COCO annotation file of the calibration images (not the test split)")
    p.add_argument("--images", type=Path, default=None, help="image folder (default: ../images next to the file)")
    p.add_argument("--limit", type=int, default=48, help="images used, spread over the file (default 48)")
    p.add_argument("--out", type=Path, default=None, help="calibrated checkpoint (default <ckpt>.calibrated.ckpt)")
    args = p.parse_args(argv)
    for path, what in ((args.ckpt, "checkpoint"), (args.annotations, "annotation file")):
        if not path.is_file():
            print(f"cellrcnn calibrate: error: {path}: no such {what}", file=sys.stderr)
            return 2
    module = load_module(args.ckpt)
    image_root = args.images or args.annotations.resolve().parent.parent / "images"
    samples = CalibrationSamples(args.annotations, image_root, args.limit, **module.input_settings)
    if not len(samples):
        print(f"cellrcnn calibrate: error: {args.annotations}: no images to calibrate on", file=sys.stderr)
        return 2
    update, report = calibrate(module, samples)
    out = args.out or args.ckpt.with_suffix(".calibrated.ckpt")
    write_calibrated(args.ckpt, update, report, out)
    print(json.dumps({k: v for k, v in report.items() if k != "grid"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
