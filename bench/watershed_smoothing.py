"""Choose the U-Net watershed's size-proportional smoothing on training images, report held-out.

    python bench/watershed_smoothing.py [--ckpt outputs/dsb2018/unet/checkpoints/calibrated.ckpt]
                                        [--factors 0,0.05,0.08,0.12,0.16] [--out bench/results]

The U-Net's maps (flip TTA as calibrated) are computed once per image; every factor of
``postprocess.smooth_per_diameter`` (sigma = max(smooth, factor × median object diameter)) is then
scored by dsb_score on the same 48 DSB2018 *training* images the thresholds were calibrated on, and
on the held-out 10 %. The factor is chosen on the training images only.
"""

from __future__ import annotations

import argparse
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
    from cellrcnn.evaluation.calibrate import pick_images

    dataset = CocoInstanceDataset(annotations, image_root=annotations.parent.parent / "images", channels=1)
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


def main(argv: list[str] | None = None) -> dict:
    from cellrcnn.modules.base import load_module

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=REPO / "outputs" / "dsb2018" / "unet" / "checkpoints" / "calibrated.ckpt")
    p.add_argument("--root", type=Path, default=REPO / "datasets" / "coco" / "bbbc038")
    p.add_argument("--train-split", default="dsb_train90")
    p.add_argument("--held-out-split", default="dsb_val10")
    p.add_argument("--factors", default="0,0.05,0.08,0.12,0.16")
    p.add_argument("--calibration-images", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    module = load_module(args.ckpt)
    postprocess = dict(module.hparams["postprocess"])
    sets = {
        "train": unet_maps(module, args.root / "annotations" / f"{args.train_split}.json", args.calibration_images),
        "held_out": unet_maps(module, args.root / "annotations" / f"{args.held_out_split}.json", None),
    }
    rows = []
    for factor in (float(f) for f in args.factors.split(",")):
        scores = {name: mean_dsb(items, {**postprocess, "smooth_per_diameter": factor}) for name, items in sets.items()}
        rows.append({"smooth_per_diameter": factor, **scores})
        print(f"[smoothing] factor {factor:.2f}: dsb train {scores['train']:.4f}  held-out {scores['held_out']:.4f}", flush=True)
    chosen = max(rows, key=lambda r: r["train"])
    result = {"checkpoint": str(args.ckpt).replace(f"{REPO}/", ""), "postprocess": postprocess,
              "n_train": len(sets["train"]), "n_held_out": len(sets["held_out"]), "rows": rows, "chosen": chosen}
    lines = [f"**U-Net watershed smoothing factor, chosen on {result['n_train']} training images**", "",
             "| smooth_per_diameter | dsb_score (training images) | dsb_score (held-out) |", "|---|---|---|"]
    lines += [f"| {r['smooth_per_diameter']:.2f} | {r['train']:.4f} | {r['held_out']:.4f} |" for r in rows]
    lines += ["", f"Chosen: {chosen['smooth_per_diameter']:.2f}. Checkpoint `{result['checkpoint']}`."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "watershed_smoothing.json").write_text(json.dumps(result, indent=1, default=float))
    (args.out / "watershed_smoothing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
