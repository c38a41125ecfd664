"""Sweep U-Net watershed settings on training images, report held-out.

    python bench/watershed_sweep.py [--ckpt outputs/dsb2018/unet/checkpoints/calibrated.ckpt]
        [--grid smooth_per_diameter=0,0.05,0.08,0.12,0.16] [--grid h=...] [--name watershed_smoothing]
        [--out bench/results]

The U-Net's maps (flip TTA as calibrated) are computed once per image; every point of the grid
(the product of the ``--grid`` lists, each a keyword of
:func:`cellrcnn.models.postprocess.unet_outputs_to_labels`; the checkpoint's settings elsewhere)
is then scored by dsb_score on the same 48 DSB2018 *training* images the thresholds were
calibrated on, and on the held-out 10 %. The setting is chosen on the training images only.
Writes ``<name>.md`` and ``<name>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]


def unet_maps(module, annotations: Path, limit: int | None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(class probabilities, distance, ground-truth labels) of up to ``limit`` spread images."""
    from cellrcnn.data.coco import CocoInstanceDataset
    from cellrcnn.data.masks import masks_to_label_image
    from cellrcnn.evaluate import input_settings
    from cellrcnn.evaluation.calibrate import pick_images

    dataset = CocoInstanceDataset(annotations, image_root=annotations.parent.parent / "images", **input_settings(module))
    rows = []
    for i in tqdm(pick_images(len(dataset), limit), desc=annotations.stem, leave=False):
        image, target = dataset[i]
        with torch.no_grad():
            probs, distance = module.predict_maps(image)
        rows.append((probs, distance, masks_to_label_image(target["masks"].numpy())))
    return rows


def mean_dsb(rows, postprocess: dict) -> float:
    from cellrcnn.evaluation.matching import dsb_score
    from cellrcnn.models.postprocess import unet_outputs_to_labels

    return float(np.mean([dsb_score(gt, unet_outputs_to_labels(p, d, **postprocess)[0]) for p, d, gt in rows]))


def parse_grid(specs: list[str]) -> dict[str, list[float]]:
    """``["h=0.02,0.05", ...]`` -> ``{"h": [0.02, 0.05], ...}``."""
    grid = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid {spec!r}: expected NAME=V1,V2,...")
        grid[name.strip()] = [float(v) for v in values.split(",")]
    return grid


def main(argv: list[str] | None = None) -> dict:
    from cellrcnn.modules.base import load_module

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=REPO / "outputs" / "dsb2018" / "unet" / "checkpoints" / "calibrated.ckpt")
    p.add_argument("--root", type=Path, default=REPO / "datasets" / "coco" / "bbbc038")
    p.add_argument("--train-split", default="dsb_train90")
    p.add_argument("--held-out-split", default="dsb_val10")
    p.add_argument("--grid", action="append", default=None,
                   help="NAME=V1,V2,... (repeatable; default smooth_per_diameter=0,0.05,0.08,0.12,0.16)")
    p.add_argument("--name", default="watershed_smoothing", help="output file stem")
    p.add_argument("--calibration-images", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    grid = parse_grid(args.grid or ["smooth_per_diameter=0,0.05,0.08,0.12,0.16"])
    torch.set_num_threads(args.threads)
    module = load_module(args.ckpt)
    postprocess = dict(module.hparams["postprocess"])
    sets = {
        "train": unet_maps(module, args.root / "annotations" / f"{args.train_split}.json", args.calibration_images),
        "held_out": unet_maps(module, args.root / "annotations" / f"{args.held_out_split}.json", None),
    }
    rows = []
    for point in itertools.product(*grid.values()):
        setting = dict(zip(grid, point, strict=True))
        scores = {name: mean_dsb(items, {**postprocess, **setting}) for name, items in sets.items()}
        rows.append({**setting, **scores})
        shown = ", ".join(f"{k} {v:g}" for k, v in setting.items())
        print(f"[sweep] {shown}: dsb train {scores['train']:.4f}  held-out {scores['held_out']:.4f}", flush=True)
    chosen = max(rows, key=lambda r: r["train"])
    result = {"checkpoint": str(args.ckpt).replace(f"{REPO}/", ""), "postprocess": postprocess,
              "n_train": len(sets["train"]), "n_held_out": len(sets["held_out"]), "rows": rows, "chosen": chosen}
    names = list(grid)
    lines = [f"**U-Net watershed settings ({', '.join(names)}), chosen on {result['n_train']} training images**", "",
             f"| {' | '.join(names)} | dsb_score (training images) | dsb_score (held-out) |",
             "|" + "---|" * (len(names) + 2)]
    lines += [f"| {' | '.join(f'{r[k]:.2f}' for k in names)} | {r['train']:.4f} | {r['held_out']:.4f} |" for r in rows]
    lines += ["", f"Chosen: {', '.join(f'{k} {chosen[k]:g}' for k in names)}. Checkpoint `{result['checkpoint']}`."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=float))
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
