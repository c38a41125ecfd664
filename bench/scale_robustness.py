"""Object size robustness: the held-out DSB2018 images at other magnifications, native vs diameter=auto.

    python bench/scale_robustness.py [--ckpt cellrcnn/weights/nuclei.ckpt] [--factors 0.5,1,2]
                                     [--limit N] [--threads 2] [--out bench/results]

Images from another objective or camera hold nuclei larger or smaller than the training set's.
This resizes every held-out image (``dsb_val10``, written by ``bench/dsb2018.py``) and its ground
truth by each factor, as a 2x lower or higher magnification would, and scores the model's
predictions at the native size (``diameter=null``) and with ``diameter=auto``, through the same
path as ``predict.py`` (tiles above 1024 px). Writes ``scale_robustness.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
METRICS = ("dsb_score", "f1@0.5", "f1@0.7", "pq@0.5")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=REPO / "cellrcnn" / "weights" / "nuclei.ckpt")
    p.add_argument("--root", type=Path, default=REPO / "datasets" / "coco" / "bbbc038")
    p.add_argument("--split", default="dsb_val10")
    p.add_argument("--factors", default="0.5,1,2")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tqdm import tqdm

    from cellrcnn.data.coco import CocoInstanceDataset
    from cellrcnn.data.masks import masks_to_label_image
    from cellrcnn.evaluate import input_settings
    from cellrcnn.evaluation.evaluator import Evaluator
    from cellrcnn.inference import predict_image
    from cellrcnn.inference.scale import predict_at_diameter, resize_image, resize_labels
    from cellrcnn.models.postprocess import labels_to_instances
    from cellrcnn.modules.base import load_module

    model = load_module(args.ckpt)
    if model.object_diameter is None:
        raise SystemExit(f"{args.ckpt}: no object_diameter recorded; package it with bench/ship_model.py")
    settings = input_settings(model)
    ds = CocoInstanceDataset(args.root / "annotations" / f"{args.split}.json", image_root=args.root / "images", **settings)
    n = min(len(ds), args.limit or len(ds))

    def predict_native(raw):
        return predict_image(raw, model.predict_instances, tile_size=1024, overlap=128, progress=False, **settings)

    factors = [float(f) for f in args.factors.split(",")]
    evaluators = {(f, mode): Evaluator(coco=False) for f in factors for mode in ("native", "auto")}
    seconds = dict.fromkeys(evaluators, 0.0)
    applied: dict[float, list[float]] = {f: [] for f in factors}
    with torch.inference_mode():
        for i in tqdm(range(n), desc="images", unit="img"):
            raw, gt = ds.load_raw(i), masks_to_label_image(ds.load_target(i)["masks"])
            for f in factors:
                image = raw if f == 1 else resize_image(raw, f)
                truth, _ = resize_labels(gt, np.ones(int(gt.max()), np.float32), image.shape[:2])
                target = labels_to_instances(truth)
                for mode in ("native", "auto"):
                    start = time.perf_counter()
                    labels, scores, info = predict_at_diameter(
                        image, predict_native, None if mode == "native" else "auto", model.object_diameter
                    )
                    seconds[f, mode] += time.perf_counter() - start
                    evaluators[f, mode].update({**target, "image_id": i}, labels_to_instances(labels, scores))
                    if mode == "auto":
                        applied[f].append(info["factor"])

    rows = []
    for (f, mode), ev in evaluators.items():
        m = ev.compute()
        rows.append({"factor": f, "mode": mode, **{k: float(m[k]) for k in METRICS},
                     "s_per_image": seconds[f, mode] / n,
                     "resized_images": sum(a != 1.0 for a in applied[f]) if mode == "auto" else 0})
    shown = str(args.ckpt.resolve().relative_to(REPO) if args.ckpt.resolve().is_relative_to(REPO) else args.ckpt)
    lines = [
        f"**Held-out DSB2018 ({n} images of {args.split}) resized by each factor, `{shown}` "
        f"(training objects: median {model.object_diameter:.1f} px)**", "",
        "| image size factor | diameter | " + " | ".join(METRICS) + " | images re-run resized | s/image |",
        "|---|---|" + "---|" * (len(METRICS) + 2),
    ]
    for r in rows:
        lines.append(f"| {r['factor']:g}× | {'auto' if r['mode'] == 'auto' else 'null (native)'} | "
                     + " | ".join(f"{r[k]:.3f}" for k in METRICS)
                     + f" | {r['resized_images'] if r['mode'] == 'auto' else '–'} | {r['s_per_image']:.2f} |")
    lines += ["", f"Command: `python bench/scale_robustness.py --factors {args.factors}"
              + (f" --limit {args.limit}" if args.limit else "") + f" --threads {args.threads}`; "
              f"{time.strftime('%Y-%m-%d')}, CPU, {args.threads} thread(s)."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_robustness.md").write_text("\n".join(lines) + "\n")
    (args.out / "scale_robustness.json").write_text(json.dumps({"checkpoint": shown, "n_images": n, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
