"""Robustness to acquisition: held-out images changed as another microscope, camera or lab would
change them, segmented by the shipped models as ``predict.py`` does, and scored per change.

    python bench/robustness.py [--model auto|nuclei|nuclei_he|CKPT] [--sources bbbc038,sbsst265,monuseg]
                               [--changes none,half,double,blur,shot_noise,camera16,vignette]
                               [--diameters default] [--limit N] [--threads 2] [--out DIR]

A model that only holds up on its own sources' pixels fails users on their first image. Every
held-out (``test``) image of each converted source (``datasets/coco/<source>``) is changed by:

- ``half`` / ``double``: a 2× lower / higher magnification (image and ground truth resized);
- ``blur``: slight defocus (Gaussian, sigma 1.5 px at the image's size);
- ``shot_noise``: a dim exposure: Poisson counts at 30 photons for the brightest pixel;
- ``camera16``: a 12-bit camera in a 16-bit file: offset 100, signal up to 1,100 of 65,535;
- ``vignette``: uneven illumination falling to 50 % at the corners;

and segmented through :class:`cellrcnn.api.Segmenter` (``model=auto`` chooses per image, as
``predict.py`` does) with each ``--diameters`` mode (``default``: each model's own; ``shrink``,
``auto``, ``null``). Writes ``robustness.md`` / ``.json`` under
``--out`` (dsb_score / f1@0.5 / pq@0.5 per source and change, and the images per model chosen).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
METRICS = ("dsb_score", "f1@0.5", "pq@0.5")
CHANGES: dict[str, str] = {
    "none": "as acquired",
    "half": "2× lower magnification",
    "double": "2× higher magnification",
    "blur": "defocus (Gaussian sigma 1.5 px)",
    "shot_noise": "dim exposure (Poisson, 30 photons at the brightest pixel)",
    "camera16": "12-bit camera in a 16-bit file (offset 100, signal to 1,100)",
    "vignette": "uneven illumination (50 % at the corners)",
}
SCALE = {"half": 0.5, "double": 2.0}


def _unit(raw: np.ndarray) -> np.ndarray:
    """Pixels as float in [0, 1] by the dtype's range (8-bit files here)."""
    top = np.iinfo(raw.dtype).max if np.issubdtype(raw.dtype, np.integer) else max(float(raw.max()), 1e-6)
    return raw.astype(np.float32) / top


def change_image(raw: np.ndarray, change: str, rng: np.random.Generator) -> np.ndarray:
    """``raw`` (H×W or H×W×C) as ``change`` would have acquired it; same size (scaling is separate)."""
    if change in ("none", *SCALE):
        return raw
    x = _unit(raw)
    if change == "blur":
        sigma = (1.5, 1.5, 0)[: x.ndim]
        return (np.clip(ndimage.gaussian_filter(x, sigma), 0, 1) * 255).round().astype(np.uint8)
    if change == "shot_noise":
        return rng.poisson(x * 30.0).astype(np.uint16)  # a photon-counting image, not rescaled
    if change == "camera16":
        return (100 + x * 1000).round().astype(np.uint16)
    if change == "vignette":
        h, w = x.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2  # 2 at the corners
        gain = 1.0 - 0.25 * r2
        # a bright background (brightfield, H&E) darkens with the light; so do bright nuclei
        return (np.clip(x * (gain[..., None] if x.ndim == 3 else gain), 0, 1) * 255).round().astype(np.uint8)
    raise ValueError(f"unknown change {change!r}; one of {', '.join(CHANGES)}")


def load_segmenter(model: str):
    from cellrcnn.api import Segmenter, available_models

    if model in ("auto", *available_models()):
        return Segmenter.from_pretrained(model)
    return Segmenter.from_checkpoint(model)


def run(segment: Callable, sources: list[str], changes: list[str], diameters: list[str],
        limit: int | None, coco_root: Path = REPO / "datasets" / "coco", progress: bool = True) -> list[dict]:
    """Rows ``{source, change, diameter, n_images, models, <METRICS>, s_per_image}``."""
    from tqdm import tqdm

    from cellrcnn.data.coco import CocoInstanceDataset
    from cellrcnn.data.masks import masks_to_label_image
    from cellrcnn.evaluation.evaluator import Evaluator
    from cellrcnn.inference.scale import resize_image, resize_labels

    rows = []
    for source in sources:
        root = coco_root / source
        ds = CocoInstanceDataset(root / "annotations" / "test.json", image_root=root / "images")
        n = min(len(ds), limit or len(ds))
        evaluators = {(c, d): Evaluator(coco=False) for c in changes for d in diameters}
        seconds, models = dict.fromkeys(evaluators, 0.0), {k: Counter() for k in evaluators}
        for i in tqdm(range(n), desc=source, unit="img", disable=not progress):
            raw, gt = ds.load_raw(i), masks_to_label_image(ds.load_target(i)["masks"])
            for change in changes:
                rng = np.random.default_rng(i)  # the same noise for every diameter mode
                image, truth = change_image(raw, change, rng), gt
                if change in SCALE:
                    image = resize_image(raw, SCALE[change])
                    truth, _ = resize_labels(gt, np.ones(int(gt.max()), np.float32), image.shape[:2])
                for diameter in diameters:
                    start = time.perf_counter()
                    result = segment(image, diameter)
                    seconds[change, diameter] += time.perf_counter() - start
                    models[change, diameter][result.info.get("model", "")] += 1
                    evaluators[change, diameter].update_labels(truth, result.labels, image_id=i)
        for (change, diameter), ev in evaluators.items():
            m = ev.compute()
            rows.append({"source": source, "change": change, "diameter": diameter, "n_images": n,
                         "models": dict(models[change, diameter]), **{k: float(m[k]) for k in METRICS},
                         "s_per_image": seconds[change, diameter] / max(n, 1)})
    return rows


def report(rows: list[dict], model: str, command: str) -> str:
    lines = [f"# Robustness to acquisition: `{model}` on each source's held-out images", "",
             "dsb_score / f1@0.5 / pq@0.5 per change; `models`: images per chosen model.", "",
             "| source | change | diameter | images | dsb_score | f1@0.5 | pq@0.5 | models | s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chosen = ", ".join(f"{k} {v}" for k, v in sorted(r["models"].items()))
        lines.append(f"| {r['source']} | {r['change']}: {CHANGES[r['change']]} | {r['diameter']} | {r['n_images']} | "
                     + " | ".join(f"{r[k]:.3f}" for k in METRICS) + f" | {chosen} | {r['s_per_image']:.2f} |")
    lines += ["", f"Command: `{command}`; {time.strftime('%Y-%m-%d')}, CPU, {torch.get_num_threads()} thread(s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto", help="auto, a shipped model's name, or a checkpoint path")
    p.add_argument("--sources", default="bbbc038,sbsst265,monuseg")
    p.add_argument("--changes", default=",".join(CHANGES))
    p.add_argument("--diameters", default="default", help="comma-separated diameter modes (default, shrink, auto, null)")
    p.add_argument("--coco-root", type=Path, default=REPO / "datasets" / "coco",
                   help="where the converted sources are (<root>/<source>/annotations/test.json)")
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out images of each source")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "robustness")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    changes = args.changes.split(",")
    for change in changes:
        if change not in CHANGES:
            p.error(f"unknown change {change!r}; one of {', '.join(CHANGES)}")
    sources = [s for s in args.sources.split(",") if (args.coco_root / s / "annotations" / "test.json").is_file()]
    if not sources:
        raise SystemExit(f"none of {args.sources} is converted under {args.coco_root} (see datasets/README.md)")
    diameters = args.diameters.split(",")

    segmenter = load_segmenter(args.model)
    with torch.inference_mode():
        rows = run(lambda image, d: segmenter.segment(image, diameter=None if d in ("null", "native") else d),
                   sources, changes, diameters, args.limit, args.coco_root)
    command = "python bench/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(rows, args.model, command.strip())
    (args.out / "robustness.md").write_text(text)
    (args.out / "robustness.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
