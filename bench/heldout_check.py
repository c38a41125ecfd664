"""End-to-end check of the shipped model on held-out DSB2018 images, through the user commands.

    python bench/heldout_check.py [--out bench/results/heldout] [--threads 2]

Writes a few images of the converted DSB2018's held-out split (``test``: fluorescence, brightfield
and H&E-stained tissue) as 8-bit PNG and as 16-bit TIFF, with their ground truth as label TIFFs,
then runs exactly what a user would:

    python predict.py input=<out>/png output=<out>/pred_png
    python -m cellrcnn.evaluation <out>/pred_png <out>/gt --json <out>/metrics_png.json

(and the same for the TIFFs), and writes ``heldout_predict.md`` / ``.json`` next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# held-out ImageIds (prefixes): fluorescence 256² / 520×696 / 1040×1388 (tiled), grey brightfield
# 1024², and two H&E tissue crops
DEFAULT_IDS = ("29dd28df98ee", "fc22db33a249", "c901794d1a42", "1a1155256916", "5d75a63972ef", "947c0d94c821")
METRICS = ("dsb_score", "f1@0.5", "f1@0.7", "precision@0.5", "recall@0.5", "pq@0.5", "dice")


def export(root: Path, ids: tuple[str, ...], out: Path) -> list[dict]:
    """Write png/, tif16/ and gt/ under ``out``; returns one row per image."""
    import tifffile
    from PIL import Image

    from cellrcnn.data.coco import CocoInstanceDataset
    from cellrcnn.data.masks import masks_to_label_image
    from cellrcnn.io import write_label_image

    ds = CocoInstanceDataset(root / "annotations" / "test.json", image_root=root / "images", channels=1)
    by_stem = {Path(im["file_name"]).stem: i for i, im in enumerate(ds.images)}
    rows = []
    for d in ("png", "tif16", "gt"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for prefix in ids:
        stem = next((s for s in by_stem if s.startswith(prefix)), None)
        if stem is None:
            raise SystemExit(f"{prefix}: not in the held-out split {ds.annotation_file}")
        index = by_stem[stem]
        raw = ds.load_raw(index)
        colour = raw.ndim == 3 and not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 1], raw[..., 2]))
        if not colour and raw.ndim == 3:
            raw = raw[..., 0]  # grey stored as RGB: keep one plane, as a microscope would write it
        short = stem[:12]
        Image.fromarray(raw).save(out / "png" / f"{short}.png")
        tifffile.imwrite(out / "tif16" / f"{short}.tif", raw.astype(np.uint16) * 257)  # full 16-bit range
        labels = masks_to_label_image(ds.load_target(index)["masks"])
        write_label_image(out / "gt" / f"{short}.tif", labels)
        kind = "H&E tissue" if colour else ("brightfield" if raw.mean() > 128 else "fluorescence")
        rows.append({"image": short, "kind": kind, "size": f"{raw.shape[1]}×{raw.shape[0]}", "n_gt": int(labels.max())})
    return rows


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO / "datasets" / "coco" / "bbbc038")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "heldout")
    p.add_argument("--ids", default=",".join(DEFAULT_IDS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt", default=None, help="checkpoint to use instead of the shipped model")
    args = p.parse_args(argv)
    out = args.out.resolve()
    rows = export(args.root, tuple(args.ids.split(",")), out)
    summary = {"images": rows, "sets": {}}
    for kind in ("png", "tif16"):
        pred = out / f"pred_{kind}"
        ckpt = [f"ckpt_path={args.ckpt}"] if args.ckpt else []
        run([sys.executable, "predict.py", f"input={out / kind}", f"output={pred}", f"threads={args.threads}", *ckpt])
        run([sys.executable, "-m", "cellrcnn.evaluation", str(pred), str(out / "gt"), "--json", str(out / f"metrics_{kind}.json")])
        summary["sets"][kind] = json.loads((out / f"metrics_{kind}.json").read_text())
    lines = ["**Shipped model through `predict.py` + `python -m cellrcnn.evaluation`, held-out DSB2018 images**", "",
             "| input | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for kind, m in summary["sets"].items():
        lines.append(f"| {kind} ({len(rows)} images) | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |")
    per = {str(r.get("name", r.get("image_id"))): r for r in summary["sets"]["png"].get("per_image", [])}
    lines += ["", "| image | kind | size | GT nuclei | dsb_score (png) |", "|---|---|---|---|---|"]
    for r in rows:
        score = next((v.get("dsb_score") for k, v in per.items() if str(k).startswith(r["image"])), None)
        lines.append(f"| {r['image']} | {r['kind']} | {r['size']} | {r['n_gt']} | "
                     f"{'n/a' if score is None else f'{score:.3f}'} |")
    (out.parent / "heldout_predict.md").write_text("\n".join(lines) + "\n")
    (out.parent / "heldout_predict.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
