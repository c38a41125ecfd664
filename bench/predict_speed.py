"""Prediction speed, memory and accuracy of the real ``predict.py`` path, in one run.

    python bench/predict_speed.py [--model nuclei] [--model mrcnn=path/calibrated.ckpt] [--setting fast:precision=auto,tta=false] \
        [--threads 2] [--big 8000] [--label after] [--out bench/results/predict_speed]

For every model and setting (predict.py overrides), on the held-out annotated images
(``datasets/coco/bbbc038`` and ``datasets/coco/sbsst265`` test splits, converted as the README says):

- **warm**: ``cellrcnn.predict.run`` (reading, the model, the label TIFF and the overlay PNG) on a
  folder per image size, after one warm-up image: seconds per image and megapixels per second;
- **accuracy**: the mean per-image dsb_score of the label TIFFs it wrote, per source (DSB2018's 64
  and S-BSST265's 4 test images), so a faster setting is checked in the same run;
- **cold start**: ``python predict.py input=<one 512² image> output=...`` in a fresh process, wall
  time to its exit (and ``python -c "import torch"`` alone, the floor);
- **large field**: ``predict.py`` on a ``--big``² 16-bit field tiled from the held-out
  fluorescence images: wall time and peak resident memory of the process (``os.wait4``);
- **threads under load**: the 520×696 folder with ``threads=1`` and ``threads=2`` while another
  process keeps one core busy (idle OpenMP threads sleep, as in ``cellrcnn predict``; run with
  ``OMP_WAIT_POLICY=ACTIVE`` to measure spinning ones).

Results: ``<out>/<label>.json`` and a Markdown table ``<out>/<label>.md``. The same script runs
against an older checkout (``PYTHONPATH=<old tree> python bench/predict_speed.py --label before
--setting default:``) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# as `cellrcnn predict` does before torch loads (a user's OMP_WAIT_POLICY=ACTIVE measures spinning threads)
try:
    from cellrcnn.cli import yielding_threads

    yielding_threads()
except ImportError:  # an older checkout (PYTHONPATH=<old tree>): its own behaviour
    pass

REPO = Path(__file__).resolve().parents[1]
SIZES = {"256x256": lambda h, w: (h, w) == (256, 256), "520x696": lambda h, w: (h, w) == (520, 696),
         "1024x1280+": lambda h, w: h >= 1000 and w >= 1280}


def coco_images(root: Path, split: str = "test") -> list[dict]:
    d = json.loads((root / "annotations" / f"{split}.json").read_text())
    by_image: dict[int, list] = {}
    for a in d["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    return [{**im, "path": root / "images" / Path(im["file_name"]).name, "annotations": by_image.get(im["id"], [])}
            for im in d["images"]]


def gt_labels(image: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    h, w = image["height"], image["width"]
    labels = np.zeros((h, w), np.int32)
    for k, a in enumerate(image["annotations"], start=1):
        seg = a["segmentation"]
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) or isinstance(seg.get("counts"), list) else seg
        m = mask_utils.decode(rle if isinstance(rle, dict) else mask_utils.merge(rle)).astype(bool)
        labels[m & (labels == 0)] = k
    return labels


def folder_of(images: list[dict], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        link = folder / im["path"].name
        if not link.exists():
            link.symlink_to(im["path"].resolve())
    return folder


def model_arg(model: str) -> list[str]:
    """predict.py's model option: ``NAME=CHECKPOINT`` a trained file (``ckpt_path``), else a shipped
    model's name; none for ``auto`` (the default, also of versions without the option)."""
    _, is_file, path = model.partition("=")
    if is_file:
        return [f"ckpt_path={path}"]
    return [] if model == "auto" else [f"model={model}"]


def run_predict(input_dir: Path, out: Path, overrides: list[str]) -> float:
    from cellrcnn.config import compose_config
    from cellrcnn.predict import run

    start = time.perf_counter()
    run(compose_config("predict", [f"input={input_dir}", f"output={out}", *overrides], out))
    return time.perf_counter() - start


def warm_and_accuracy(model: str, overrides: list[str], sets: dict, work: Path, timed: bool = True,
                      scored: bool = True) -> dict:
    from cellrcnn.evaluation.matching import dsb_score
    from cellrcnn.io import read_label_image

    base = [*model_arg(model), *overrides]
    first = next(iter(sets["256x256"]))
    run_predict(folder_of([first], work / "warmup"), work / "warmup_out", base)  # model load, first-call costs
    speed = {}
    for size, images in (sets.items() if timed else ()):
        if size not in SIZES:
            continue
        out = work / f"out_{size}"
        seconds = run_predict(folder_of(images, work / f"in_{size}"), out, base)
        mp = sum(im["height"] * im["width"] for im in images) / 1e6
        speed[size] = {"images": len(images), "s_per_image": round(seconds / len(images), 3),
                       "mp_per_s": round(mp / seconds, 3)}
    scores: dict[str, list[float]] = {}
    for source, images in (sets["_by_source"].items() if scored else ()):
        out = work / f"acc_{source}"
        run_predict(folder_of(images, work / f"accin_{source}"), out, [*base, "overlays=false"])
        scores[source] = [dsb_score(gt_labels(im), read_label_image(out / f"{im['path'].stem}.tif")) for im in images]
    return {"speed": speed, "dsb_score": {s: round(float(np.mean(v)), 4) for s, v in scores.items()},
            "n_images": {s: len(v) for s, v in scores.items()}}


def timed_process(cmd: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit status) of one command in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def cold_start(model: str, overrides: list[str], image: Path, work: Path, repeats: int = 3) -> dict:
    from PIL import Image

    arr = np.asarray(Image.open(image))
    small = work / "cold" / "one.png"
    small.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.pad(arr, [(0, max(0, 512 - arr.shape[0])), (0, max(0, 512 - arr.shape[1]))]
                           + [(0, 0)] * (arr.ndim - 2), mode="reflect")[:512, :512]).save(small)
    runs = [timed_process([sys.executable, "predict.py", f"input={small}", f"output={work / 'cold_out'}",
                           *model_arg(model), *overrides])[0] for _ in range(repeats)]
    torch_only = [timed_process([sys.executable, "-c", "import torch"])[0] for _ in range(repeats)]
    return {"predict_512_s": round(statistics.median(runs), 2), "import_torch_s": round(statistics.median(torch_only), 2)}


def fluorescence_tiles(images: list[dict]) -> list[tuple[np.ndarray, dict]]:
    """(float32 grey pixels, image record) of the grey fluorescence images among ``images``: not
    stained, not bright-background."""
    from cellrcnn.io import read_image

    tiles = []
    for im in images:
        raw = np.asarray(read_image(im["path"]), np.float32)
        if raw.ndim == 3:
            if np.abs(raw[..., 0] - raw[..., -1]).mean() > 2:  # stained: not a fluorescence field
                continue
            raw = raw.mean(-1)
        if np.median(raw) < 0.5 * raw.max():
            tiles.append((raw, im))
    return tiles


def big_field(size: int, images: list[dict], work: Path) -> Path:
    """A size×size uint16 field tiled from grey fluorescence images (12-bit range, as a camera writes)."""
    import tifffile

    path = work / f"field_{size}.tif"
    if path.exists():
        return path
    tiles = [raw for raw, _ in fluorescence_tiles(images)]
    field = np.zeros((size, size), np.uint16)
    y = 0
    k = 0
    while y < size:
        x, row_h = 0, 0
        while x < size:
            t = tiles[k % len(tiles)]
            k += 1
            h, w = min(t.shape[0], size - y), min(t.shape[1], size - x)
            field[y : y + h, x : x + w] = (t[:h, :w] / max(float(t.max()), 1.0) * 4000 + 100).astype(np.uint16)
            x += w
            row_h = max(row_h, h)
        y += row_h
    tifffile.imwrite(path, field)
    return path


def large(model: str, overrides: list[str], field: Path, work: Path) -> dict:
    wall, rss, status = timed_process([sys.executable, "predict.py", f"input={field}", f"output={work / 'big_out'}",
                                       *model_arg(model), *overrides])
    info = json.loads((work / "big_out" / "predictions.json").read_text())["images"][0] if status == 0 else {}
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(rss), "exit": status, "objects": info.get("n_objects")}


def under_load(model: str, overrides: list[str], images: list[dict], work: Path) -> dict:
    """Seconds per 520×696 image while another process keeps one core busy."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = {}
        for threads in (1, 2):
            over = [*model_arg(model), *overrides, f"threads={threads}"]
            run_predict(folder_of(images[:1], work / "load_warm"), work / "load_warm_out", over)
            seconds = run_predict(folder_of(images, work / "load_in"), work / f"load_out_{threads}", over)
            out[f"threads={threads}"] = round(seconds / len(images), 3)
        return out
    finally:
        burner.kill()


def markdown(label: str, results: dict, command: str) -> str:
    lines = [f"# Prediction speed: {label}", "", f"Command: `{command}`", "",
             "| model, setting | " + " | ".join(f"{s} s/img (MP/s)" for s in SIZES)
             + " | DSB2018 dsb | S-BSST265 dsb | cold start 512² (s) | big field s / peak MB | 520×696 under load: 1 / 2 threads (s) |",
             "|" + "---|" * (len(SIZES) + 6)]
    for key, r in results["runs"].items():
        sp = r["speed"]
        big = r.get("large", {})
        load = r.get("under_load", {})
        lines.append(
            f"| {key} | " + " | ".join(f"{sp[s]['s_per_image']} ({sp[s]['mp_per_s']})" if s in sp else "–" for s in SIZES)
            + f" | {r['dsb_score'].get('bbbc038', '–')} | {r['dsb_score'].get('sbsst265', '–')}"
            + f" | {r.get('cold', {}).get('predict_512_s', '–')}"
            + f" | {big.get('wall_s', '–')} / {big.get('peak_rss_mb', '–')}"
            + f" | {load.get('threads=1', '–')} / {load.get('threads=2', '–')} |")
    cold = next((r["cold"] for r in results["runs"].values() if "cold" in r), None)
    if cold:
        lines += ["", f"`python -c \"import torch\"` alone: {cold['import_torch_s']} s."]
    lines += ["", f"Machine: {results['machine']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="a shipped model's name, or NAME=CHECKPOINT (repeatable; default nuclei)")
    p.add_argument("--setting", action="append", default=[],
                   help="NAME:key=value,key=value predict.py overrides (repeatable; default 'default:')")
    p.add_argument("--threads", type=int, default=None, help="threads=N for every run (default: predict.py's)")
    p.add_argument("--big", type=int, default=8000, help="side of the large field (0: skip)")
    p.add_argument("--skip", default="", help="comma-separated: speed (warm timing), accuracy, cold, large, load")
    p.add_argument("--data", type=Path, default=REPO / "datasets" / "coco")
    p.add_argument("--label", default="after")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict_speed")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    dsb, sbs = coco_images(args.data / "bbbc038"), coco_images(args.data / "sbsst265")
    sets = {size: [im for im in dsb + sbs if rule(im["height"], im["width"])] for size, rule in SIZES.items()}
    sets["_by_source"] = {"bbbc038": dsb, "sbsst265": sbs}
    speed_sets = {k: v for k, v in sets.items() if k in SIZES}
    settings = [s.split(":", 1) for s in (args.setting or ["default:"])]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        field = big_field(args.big, dsb, work) if args.big and "large" not in skip else None
        for model in args.model or ["nuclei"]:
            for name, spec in settings:
                overrides = [o for o in spec.split(",") if o]
                if args.threads:
                    overrides.append(f"threads={args.threads}")
                key = f"{model.partition('=')[0]}, {name}"
                print(f"== {key}: {overrides}", flush=True)
                sub = work / f"{model.partition('=')[0]}_{name}"
                r = warm_and_accuracy(model, overrides, {**speed_sets, "_by_source": sets["_by_source"]}, sub,
                                      timed="speed" not in skip, scored="accuracy" not in skip)
                if "cold" not in skip:
                    r["cold"] = cold_start(model, overrides, sets["256x256"][0]["path"], sub)
                if field is not None:
                    r["large"] = large(model, overrides, field, sub)
                if "load" not in skip:
                    r["under_load"] = under_load(model, [o for o in overrides if not o.startswith("threads=")],
                                                 sets["520x696"], sub)
                runs[key] = {"overrides": overrides, **r}
                print(json.dumps(runs[key], indent=1), flush=True)
    import platform

    import torch

    results = {"label": args.label, "runs": runs, "torch": torch.__version__,
               "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                          f"torch {torch.__version__}, default threads {torch.get_num_threads()}"}
    command = "python bench/predict_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.label}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{args.label}.md").write_text(markdown(args.label, results, command))
    print(markdown(args.label, results, command))


if __name__ == "__main__":
    main()
