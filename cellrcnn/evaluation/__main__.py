"""Score a folder of predicted label images against a folder of GT label images.

    python -m cellrcnn.evaluation PRED_DIR GT_DIR [--json OUT] [--no-coco]

Files are TIFF, PNG or NPY label images (0 = background; a Cellpose ``_seg.npy`` with
``--allow-pickle``, as it is a pickle that could run code) and
are paired by file stem. When no prediction has exactly the GT stem, the stem plus one of
``_masks``, ``_cp_masks``, ``_pred``, ``_label``, ``_labels``, ``_seg`` is tried (the names Cellpose,
StarDist scripts and others write). A GT image without a prediction is scored against an empty
prediction (all its objects are misses). A shape mismatch or a missing/empty GT folder is an error.

Prints one JSON object with the label-image metrics (``dsb_score``, ``f1@t``, ``precision@t``,
``recall@t``, ``pq@t``, ``dice``, ``jaccard``, ``pixel_accuracy``, split/merge counts) and COCO AP.
Label images carry no confidence scores, so every object gets score 1: COCO AP is then computed
from an arbitrary ranking (file/label order) and is degenerate; prefer the matching metrics here and
compute AP from scored instance predictions. ``--json OUT`` writes the same object plus ``per_image``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..io import LABEL_SUFFIXES, read_label_image
from .evaluator import Evaluator

PRED_SUFFIXES = ("", "_masks", "_cp_masks", "_pred", "_label", "_labels", "_seg")


def _label_files(folder: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES and not p.name.startswith("."):
            files.setdefault(p.stem, []).append(p)
    return files


def find_prediction(stem: str, preds: dict[str, list[Path]]) -> Path | None:
    """The prediction file for a GT stem (exact stem first, then the common suffixes); None if absent."""
    for suffix in PRED_SUFFIXES:
        found = preds.get(stem + suffix)
        if found:
            if len(found) > 1:
                raise ValueError(f"ambiguous predictions for {stem}: {', '.join(str(p) for p in found)}")
            return found[0]
    return None


def evaluate_folders(
    pred_dir: Path, gt_dir: Path, coco: bool = True, progress: bool = True, allow_pickle: bool = False,
    plane: int | None = None,
) -> tuple[dict, list]:
    """Metrics over all GT label images in ``gt_dir``; returns (metrics, per_image).

    ``allow_pickle``: read Cellpose ``_seg.npy`` files (pickles: only for files you trust).
    ``plane``: the plane of multi-page label TIFFs to score (a stack without it is an error)."""
    import numpy as np
    from tqdm import tqdm

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((gt_dir, "GT"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    gts = _label_files(gt_dir)
    if not gts:
        raise FileNotFoundError(f"GT folder {gt_dir} holds no label images ({', '.join(LABEL_SUFFIXES)})")
    preds = _label_files(pred_dir)
    ev = Evaluator(coco=coco, extra_metrics=True)
    missing = []
    for i, (stem, paths) in enumerate(
        tqdm(sorted(gts.items()), desc="evaluating", file=sys.stderr, disable=not progress)
    ):
        if len(paths) > 1:
            raise ValueError(f"ambiguous GT files for {stem}: {', '.join(str(p) for p in paths)}")
        gt = read_label_image(paths[0], allow_pickle=allow_pickle, plane=plane)
        pred_path = find_prediction(stem, preds)
        if pred_path is None:
            missing.append(stem)
            pred = np.zeros_like(gt)
        else:
            pred = read_label_image(pred_path, allow_pickle=allow_pickle, plane=plane)
            if pred.shape != gt.shape:
                raise ValueError(
                    f"{pred_path}: prediction shape {pred.shape} differs from GT {paths[0]} shape {gt.shape}"
                )
        ev.update_labels(gt, pred, image_id=i, name=paths[0].name)
    metrics = ev.compute()
    metrics["n_missing_predictions"] = len(missing)
    if missing:
        print(f"{len(missing)} GT image(s) without a prediction, scored as empty: {', '.join(missing[:10])}"
              + (" ..." if len(missing) > 10 else ""), file=sys.stderr)  # fmt: skip
    return metrics, ev.per_image


def _jsonable(d: dict) -> dict:
    # JSON has no NaN; null marks an undefined metric
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cellrcnn score", description=__doc__.split("\n\n")[0],
        epilog="example: cellrcnn score predictions/ ground_truth/ --json scores.json",
    )
    parser.add_argument("pred_dir", type=Path, help="folder of predicted label images")
    parser.add_argument("gt_dir", type=Path, help="folder of ground-truth label images")
    parser.add_argument("--json", type=Path, default=None, help="also write metrics and per-image rows here")
    parser.add_argument("--no-coco", action="store_true", help="skip COCO AP (faster)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read Cellpose _seg.npy files (pickles run code: only for files you trust)")
    parser.add_argument("--plane", type=int, default=None, help="plane of multi-page label TIFFs to score")
    args = parser.parse_args(argv)
    try:
        metrics, per_image = evaluate_folders(
            args.pred_dir, args.gt_dir, coco=not args.no_coco, progress=not args.quiet,
            allow_pickle=args.allow_pickle, plane=args.plane,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = _jsonable(metrics)
    print(json.dumps(out, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {**out, "per_image": [_jsonable(r) for r in per_image]}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
