"""Tiled prediction against annotations: how the tile overlap (and tiling at all) moves accuracy.

    python bench/tile_overlap.py [--size 2048] [--overlaps 128,96,64,auto] [--out bench/results/predict_speed]

A ``--size``² 16-bit field is tiled from DSB2018's held-out fluorescence images, as
``bench/predict_speed.py`` builds its large field, and their annotations are tiled the same way.
The shipped ``nuclei`` predicts it at native size in one piece and in 896-px tiles with each
overlap (``auto``: the segmenter's own choice, ``cellrcnn.api.Segmenter.tile_overlap_for``);
each result is scored against the annotations (dsb_score, f1@0.5) and against the one-piece
result. Writes ``tile_overlap.json`` and ``tile_overlap.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_speed import coco_images, fluorescence_tiles, gt_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def annotated_field(size: int, images: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 field, int32 label field) tiled row by row from the grey fluorescence images, as
    ``predict_speed.big_field`` tiles them."""
    tiles = [(raw, gt_labels(im)) for raw, im in fluorescence_tiles(images)]
    field, labels = np.zeros((size, size), np.uint16), np.zeros((size, size), np.int32)
    y = k = 0
    next_label = 1
    while y < size:
        x, row_h = 0, 0
        while x < size:
            raw, gt = tiles[k % len(tiles)]
            k += 1
            h, w = min(raw.shape[0], size - y), min(raw.shape[1], size - x)
            field[y : y + h, x : x + w] = (raw[:h, :w] / max(float(raw.max()), 1.0) * 4000 + 100).astype(np.uint16)
            part = gt[:h, :w]
            labels[y : y + h, x : x + w] = np.where(part > 0, part + next_label, 0)
            next_label += int(gt.max()) + 1
            x += w
            row_h = max(row_h, h)
        y += row_h
    return field, labels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--overlaps", default="128,96,64,auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict_speed")
    args = p.parse_args(argv)

    import torch

    from cellrcnn.api import Segmenter
    from cellrcnn.evaluation.matching import dsb_score, match_counts

    torch.set_num_threads(args.threads)
    field, gt = annotated_field(args.size, coco_images(REPO / "datasets" / "coco" / "bbbc038"))

    def scored(labels: np.ndarray, seconds: float, reference: np.ndarray | None = None) -> dict:
        counts = match_counts(gt, labels, (0.5,))[0]
        row = {"seconds": round(seconds, 1), "objects": int(len(np.unique(labels)) - 1),
               "dsb_score": round(dsb_score(gt, labels), 4), "f1@0.5": round(counts.f1, 4)}
        if reference is not None:
            row["dsb_score_vs_one_piece"] = round(dsb_score(reference, labels), 4)
        return row

    rows = {}
    start = time.perf_counter()
    one_piece = Segmenter.from_pretrained("nuclei", tile_size=args.size).segment(field, diameter=None).labels
    rows["one piece"] = scored(one_piece, time.perf_counter() - start)
    for overlap in args.overlaps.split(","):
        segmenter = Segmenter.from_pretrained("nuclei", tile_size=896,
                                              tile_overlap=None if overlap == "auto" else int(overlap))
        start = time.perf_counter()
        labels = segmenter.segment(field, diameter=None).labels
        name = f"896-px tiles, overlap {overlap}"
        if overlap == "auto":
            name += f" ({segmenter.tile_overlap_for(field)} px)"
        rows[name] = scored(labels, time.perf_counter() - start, one_piece)
        print(name, rows[name], flush=True)

    command = "python bench/tile_overlap.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Tile overlap: a {args.size}² field of {int(len(np.unique(gt)) - 1)} held-out DSB2018 nuclei",
             "", f"`{command.strip()}`; shipped `nuclei`, native size, 4 views.", "",
             "| prediction | seconds | objects | dsb_score | f1@0.5 | dsb_score against one piece |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['seconds']} | {v['objects']} | {v['dsb_score']} | {v['f1@0.5']} | "
              f"{v.get('dsb_score_vs_one_piece', '–')} |" for k, v in rows.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tile_overlap.json").write_text(json.dumps(rows, indent=1))
    (args.out / "tile_overlap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
