"""DSB2018 (BBBC038 stage 1) benchmark: Mask R-CNN cell preset vs U-Net vs Otsu + watershed.

    python bench/dsb2018.py [--budget-min 60] [--models maskrcnn,unet] [--out bench/results]
                            [--sequential | --parallel] [--threads 1] [--calibration-images 48]
                            [--train-only | --skip-train [--reuse-calibration]]

1. Converts ``stage1_train.zip`` to COCO (``datasets/coco/bbbc038``) unless already converted.
2. Splits every image 90/10 by the SHA-256 of its ImageId (``split_by_hash``, salt ``dsb2018``),
   written as ``annotations/dsb_train90.json`` and ``annotations/dsb_val10.json``.
3. Trains each model with the project's own ``train.py experiment=bbbc038_<model>`` for a fixed
   wall budget (``trainer.max_time``): one after the other, each as two single-threaded DDP
   processes on the two cores (the experiments' ``trainer=ddp``), or side by side.
4. Chooses each run's decision thresholds on 48 full *training* images
   (``cellrcnn.evaluation.calibrate``: score/mask thresholds; watershed foreground, seed depth,
   boundary weight and object score).
5. Scores the calibrated final weights of each run and the classical floor on the held-out 10 %
   (full images) with the shared Evaluator, overall and by imaging modality (fluorescence,
   brightfield, stained), and writes ``dsb2018.json`` and ``dsb2018.md`` to ``--out``.
   ``--skip-train`` re-scores existing runs (``--reuse-calibration`` keeps their calibration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
DEFAULT_ROOT = REPO / "datasets" / "coco" / "bbbc038"
SPLITS = ("dsb_train90", "dsb_val10")
SALT = "dsb2018"
MODELS = ("maskrcnn", "unet")
COLUMNS = ("dsb_score", "segm_AP", "segm_AP50", "f1@0.5", "f1@0.7", "pq@0.5", "dice")


def shown(text: str | Path) -> str:
    """``text`` with this repository's absolute path removed, so recorded commands and paths read the
    same on every machine."""
    return str(text).replace(f"{REPO}/", "")


def ensure_converted(src: Path, root: Path) -> None:
    """Run the bbbc038 converter unless ``root`` already holds a finished conversion."""
    if any(p.stem not in SPLITS for p in (root / "annotations").glob("*.json")):
        print(f"[dsb2018] using the converted dataset in {root}")
        return
    if not src.is_file():
        raise SystemExit(f"{src}: stage1_train.zip not found (give --src)")
    cmd = [sys.executable, "-m", "cellrcnn.data.convert", "bbbc038", "--src", str(src), "--out", str(root)]
    print("[dsb2018] converting:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def image_key(image: dict) -> str:
    """The DSB ImageId (file stem) of a COCO image entry: stable across converters and re-runs."""
    return Path(image["file_name"]).stem


def write_split(root: Path) -> dict[str, int]:
    """Merge the converter's split files and write the 90/10 hash split; returns image counts."""
    from cellrcnn.data.coco import load_coco_json
    from cellrcnn.data.splits import split_by_hash

    ann_dir = root / "annotations"
    sources = [p for p in sorted(ann_dir.glob("*.json")) if p.stem not in SPLITS]
    if not sources:
        raise SystemExit(f"{ann_dir}: no COCO annotation files")
    images, annotations, base = {}, {}, None
    for path in sources:
        data = load_coco_json(path)
        base = base or data
        for im in data["images"]:
            images[im["id"]] = im
        for ann in data["annotations"]:
            annotations[ann["id"]] = ann
    keys = {image_key(im): i for i, im in images.items()}
    groups = split_by_hash(sorted(keys), (0.9, 0.1), salt=SALT)
    counts = {}
    for name, group in zip(SPLITS, groups, strict=True):
        keep = {keys[k] for k in group}
        part = {k: v for k, v in base.items() if k not in ("images", "annotations", "info")}
        part["info"] = {**base.get("info", {}), "split": name, "split_rule": f"sha256('{SALT}:'+ImageId), 90/10"}
        part["images"] = sorted((images[i] for i in keep), key=lambda im: im["id"])
        part["annotations"] = sorted((a for a in annotations.values() if a["image_id"] in keep), key=lambda a: a["id"])
        text = json.dumps(part)
        path = ann_dir / f"{name}.json"
        if not path.is_file() or path.read_text() != text:  # leave an identical file untouched
            path.write_text(text)
        counts[name] = len(part["images"])
    print(f"[dsb2018] split {counts} (from {[p.name for p in sources]})", flush=True)
    return counts


def train_command(model: str, budget_min: float, threads: int, run_dir: Path, root: Path, extra: list[str]) -> list[str]:
    """``python train.py experiment=bbbc038_<model>`` for a wall budget on the benchmark split (the
    learning-rate schedule follows the elapsed share of ``trainer.max_time``)."""
    seconds = max(1, int(round(budget_min * 60)))
    return [
        sys.executable, "train.py", f"experiment=bbbc038_{model}",
        f"data.root={root}", f"data.train_split={SPLITS[0]}", f"data.val_split={SPLITS[1]}",
        f"data.test_split={SPLITS[1]}",
        f"trainer.max_time=00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}",
        f"threads={threads}", "test=false", "logger=tensorboard",
        f"name=dsb2018_{model}", f"hydra.run.dir={run_dir}", "callbacks.progress_bar.refresh_rate=50",
        *extra,
    ]  # fmt: skip


def run_training(models: list[str], args: argparse.Namespace, runs: Path) -> dict[str, dict]:
    """Launch the trainings (parallel or sequential); returns per model the run folder and wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    info: dict[str, dict] = {}
    procs = {}
    for model in models:
        run_dir = runs / model
        cmd = train_command(model, args.budget_min, args.threads, run_dir, args.root, args.override)
        log = open(args.out / f"dsb2018_{model}_train.log", "w")  # noqa: SIM115 (closed below)
        print(f"[dsb2018] {time.strftime('%H:%M:%S')} training {model}: {' '.join(cmd)}", flush=True)
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs[model] = (proc, log, start)
        info[model] = {"run_dir": shown(run_dir), "command": shown(" ".join(cmd[1:]))}
        if not args.parallel:
            _wait(model, procs.pop(model), info)
    for model, item in procs.items():
        _wait(model, item, info)
    return info


def _wait(model: str, item: tuple, info: dict) -> None:
    proc, log, start = item
    code = proc.wait()
    log.close()
    info[model]["train_wall_s"] = time.time() - start
    info[model]["exit_code"] = code
    print(f"[dsb2018] {time.strftime('%H:%M:%S')} {model} finished (exit {code}, {info[model]['train_wall_s']:.0f} s)",
          flush=True)


def modality(raw) -> str:
    """The imaging modality of raw pixels, for the per-modality breakdown: stained tissue shows
    colour, brightfield a bright background, fluorescence bright nuclei on a dark one."""
    from cellrcnn.data.datamodule import appearance_key

    _, _, colour, bright = appearance_key(raw)
    return "stained (H&E, colour)" if colour else "brightfield (grey)" if bright else "fluorescence"


def breakdown(per_image: list[dict], groups: list[str]) -> dict[str, dict]:
    """Per group: image count, mean dsb_score and f1@0.5 pooled over the group's objects."""
    out: dict[str, dict] = {}
    for name in sorted(set(groups)):
        rows = [r for r, g in zip(per_image, groups, strict=True) if g == name]
        tp, fp, fn = (sum(r[k] or 0 for r in rows) for k in ("tp", "fp", "fn"))
        out[name] = {"n_images": len(rows), "dsb_score": sum(r["dsb_score"] for r in rows) / len(rows),
                     "f1@0.5": 2 * tp / max(1, 2 * tp + fp + fn)}
    return out


def evaluate_predictor(dataset, predict, name: str, groups: list[str] | None = None) -> dict:
    """Shared-Evaluator metrics of ``predict(image) -> instance dict`` over ``dataset`` plus timing,
    and the same by image group (``by_modality``) when ``groups`` names each image's group."""
    import torch

    from cellrcnn.evaluation.evaluator import Evaluator

    evaluator = Evaluator(iou_thresholds=(0.5, 0.7), coco=True)
    evaluator.reset()
    seconds = 0.0
    for i in range(len(dataset)):
        image, target = dataset[i]
        start = time.perf_counter()
        with torch.no_grad():
            pred = predict(image)
        seconds += time.perf_counter() - start
        evaluator.update(target, pred)
    metrics = {k: float(v) for k, v in evaluator.compute().items()}
    metrics["infer_s_per_image"] = seconds / max(1, len(dataset))
    if groups is not None:
        metrics["by_modality"] = breakdown(evaluator.per_image, groups)
    print(f"[dsb2018] {name}: dsb_score {metrics['dsb_score']:.4f}  f1@0.5 {metrics['f1@0.5']:.4f}  "
          f"{metrics['infer_s_per_image']:.2f} s/image", flush=True)
    return metrics


def classical_predict(image):
    import torch

    from cellrcnn.baselines.classical import segment_otsu_watershed
    from cellrcnn.data.masks import label_image_to_masks, masks_to_boxes_xyxy

    masks, _ = label_image_to_masks(segment_otsu_watershed(image.numpy()))
    n = len(masks)
    return {"masks": torch.from_numpy(masks), "boxes": torch.from_numpy(masks_to_boxes_xyxy(masks)),
            "scores": torch.ones(n), "labels": torch.ones(n, dtype=torch.int64)}


def checkpoint_of(run_dir: Path) -> Path:
    """The final weights of a run (``last.ckpt``, refreshed by the validation at the time limit)."""
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run left no last.ckpt (see its training log)")
    return path


def calibrate_run(model: str, ckpt: Path, root: Path, n_images: int) -> tuple[Path, dict]:
    """Choose the run's thresholds on ``n_images`` full training images (never the held-out split)
    with ``cellrcnn.evaluation.calibrate``; returns the calibrated checkpoint and the grid report."""
    from cellrcnn.evaluate import input_settings
    from cellrcnn.evaluation.calibrate import calibrate, load_samples, write_calibrated
    from cellrcnn.modules.base import load_module

    module = load_module(ckpt)
    annotations = root / "annotations" / f"{SPLITS[0]}.json"
    samples = load_samples(annotations, root / "images", n_images, **input_settings(module))
    start = time.perf_counter()
    update, report = calibrate(module, samples)
    report["seconds"] = time.perf_counter() - start
    out = write_calibrated(ckpt, update, report, ckpt.with_name("calibrated.ckpt"))
    print(f"[dsb2018] {model}: calibrated {report['chosen']} on {len(samples)} training images "
          f"(dsb {report['previous_dsb_score']:.3f} -> {report['dsb_score']:.3f}, {report['seconds']:.0f} s)", flush=True)
    return out, report


def reused_calibration(ckpt: Path) -> tuple[Path, dict] | None:
    """The run's existing ``calibrated.ckpt`` and its grid report, when it is newer than ``ckpt``."""
    import torch

    calibrated = ckpt.with_name("calibrated.ckpt")
    if not calibrated.is_file() or calibrated.stat().st_mtime < ckpt.stat().st_mtime:
        return None
    report = torch.load(calibrated, map_location="cpu", weights_only=False).get("cellrcnn_calibration")
    return (calibrated, report) if report else None


def evaluate_all(models: list[str], runs: Path, root: Path, threads: int, limit: int | None,
                 calibration_images: int, reuse_calibration: bool = False) -> dict[str, dict]:
    import torch

    from cellrcnn.data.coco import CocoInstanceDataset
    from cellrcnn.evaluate import input_settings
    from cellrcnn.modules.base import load_module

    torch.set_num_threads(threads)
    ann = root / "annotations" / f"{SPLITS[1]}.json"
    results: dict[str, dict] = {}
    held_out = CocoInstanceDataset(ann, image_root=root / "images", channels=1)  # grey, as the floor reads it
    held_out.images = held_out.images[:limit] if limit else held_out.images
    groups = [modality(held_out.load_raw(i)) for i in range(len(held_out))]
    for model in models:
        ckpt = checkpoint_of(runs / model)
        calibration = None
        if calibration_images > 0:
            reused = reused_calibration(ckpt) if reuse_calibration else None
            ckpt, calibration = reused or calibrate_run(model, ckpt, root, calibration_images)
        module = load_module(ckpt)
        dataset = CocoInstanceDataset(ann, image_root=root / "images", **input_settings(module))
        dataset.images = dataset.images[:limit] if limit else dataset.images
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        metrics = evaluate_predictor(dataset, lambda im, m=module: m.predict_instances([im])[0], model, groups)
        metrics.update(checkpoint=shown(ckpt), global_step=int(state.get("global_step", -1)),
                       epoch=int(state.get("epoch", -1)), calibration=calibration)
        results[model] = metrics
        del module, state
    results["classical"] = evaluate_predictor(held_out, classical_predict, "otsu+watershed", groups)
    return results


def write_tables(out: Path, results: dict[str, dict], meta: dict) -> None:
    names = {"maskrcnn": "Mask R-CNN (cell preset, R18-FPN)", "unet": "U-Net (3-class + distance, watershed)",
             "classical": "Otsu + watershed (no training)"}
    head = "| model | " + " | ".join(COLUMNS) + " | training time | inference s/image |"
    lines = [f"**DSB2018 stage-1 train, held-out 10 % ({meta['n_val']} images, full size), "
             f"trained from scratch on {meta['n_train']} images**", "", head, "|" + "---|" * (len(COLUMNS) + 3)]
    for key, m in results.items():
        train = meta["training"].get(key, {})
        t = f"{train['train_wall_s'] / 60:.0f} min ({m.get('global_step', '?')} steps)" if "train_wall_s" in train else "–"
        cells = [f"{m[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {names.get(key, key)} | " + " | ".join(cells) + f" | {t} | {m['infer_s_per_image']:.2f} |")
    lines += ["", f"Budget: {meta['budget_min']} min wall per model, {meta['mode']}, {meta['threads']} torch thread(s) "
              f"each, CPU `{meta['cpu']}`; load at start `{meta['uptime_start']}`, at end `{meta['uptime_end']}`.",
              "dsb_score = mean over images of the mean over IoU 0.50:0.05:0.95 of TP/(TP+FP+FN); "
              "segm_AP from pycocotools with 1000 detections per image; f1/pq pooled over the split."]
    chosen = [f"{names.get(k, k).split(' (')[0]} {m['calibration']['chosen']} (dsb {m['calibration']['previous_dsb_score']:.3f}"
              f" -> {m['calibration']['dsb_score']:.3f} on {m['calibration']['n_images']} training images)"
              for k, m in results.items() if m.get("calibration")]
    if chosen:
        lines.append("Decision thresholds chosen after training on training images (`cellrcnn.evaluation.calibrate`): "
                     + "; ".join(chosen) + ".")
    lines += modality_table(results, names)
    (out / "dsb2018.md").write_text("\n".join(lines) + "\n")
    (out / "dsb2018.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print("\n".join(lines))


def modality_table(results: dict[str, dict], names: dict[str, str]) -> list[str]:
    """Markdown rows: dsb_score / f1@0.5 of every model per imaging modality of the held-out images."""
    scored = {k: m["by_modality"] for k, m in results.items() if m.get("by_modality")}
    if not scored:
        return []
    groups = sorted({g for by in scored.values() for g in by})
    head = "| modality (held-out images) | " + " | ".join(names.get(k, k).split(" (")[0] for k in scored) + " |"
    lines = ["", "dsb_score / f1@0.5 by imaging modality:", "", head, "|" + "---|" * (len(scored) + 1)]
    for g in groups:
        n = next(by[g]["n_images"] for by in scored.values() if g in by)
        cells = [f"{by[g]['dsb_score']:.3f} / {by[g]['f1@0.5']:.3f}" if g in by else "–" for by in scored.values()]
        lines.append(f"| {g} ({n}) | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=60.0, help="training wall budget per model, minutes")
    p.add_argument("--models", default="maskrcnn,unet")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="converted COCO dataset folder")
    p.add_argument("--runs", type=Path, default=REPO / "outputs" / "dsb2018", help="training run folders")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sequential", dest="parallel", action="store_false", default=False,
                      help="train one model after the other, each on every core (default)")
    mode.add_argument("--parallel", dest="parallel", action="store_true", help="train the models side by side")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per training process (the experiments run two DDP processes)")
    p.add_argument("--skip-train", action="store_true", help="only evaluate the existing runs")
    p.add_argument("--train-only", action="store_true", help="train, and leave the scoring to a later --skip-train")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N held-out images")
    p.add_argument("--calibration-images", type=int, default=48,
                   help="training images the decision thresholds are chosen on after training (0: keep the configured ones)")
    p.add_argument("--reuse-calibration", action="store_true",
                   help="with --skip-train: score a run's existing calibrated.ckpt instead of calibrating again")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for both trainings")
    args = p.parse_args(argv)
    args.out, args.root, args.runs = args.out.resolve(), args.root.resolve(), args.runs.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    if unknown := set(models) - set(MODELS):
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")

    sys.path.insert(0, str(REPO))
    meta = {"budget_min": args.budget_min, "mode": "parallel" if args.parallel else "sequential",
            "threads": args.threads, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "uptime_start": _uptime(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    ensure_converted(args.src, args.root)
    counts = write_split(args.root)
    meta.update(n_train=counts[SPLITS[0]], n_val=counts[SPLITS[1]], split_salt=SALT)
    previous = args.out / "dsb2018.json"
    if args.skip_train:  # keep what the training run recorded (commands, wall times, machine load)
        recorded = json.loads(previous.read_text())["meta"] if previous.is_file() else {}
        meta = {**meta, **recorded, "rescored": meta["started"]}
        meta.setdefault("training", {})
    else:
        meta["training"] = run_training(models, args, args.runs)
    if not args.skip_train:
        failed = [m for m in models if meta["training"][m]["exit_code"] != 0]
        if failed:
            print(f"[dsb2018] training failed for {failed}; scoring the others", flush=True)
            models = [m for m in models if m not in failed]
        if args.train_only:
            (args.out / "dsb2018.json").write_text(json.dumps({"meta": meta, "results": {}}, indent=1))
            return
    results = evaluate_all(models, args.runs, args.root, os.cpu_count() or 1, args.eval_limit, args.calibration_images,
                           args.reuse_calibration)
    meta.setdefault("uptime_end", _uptime())
    meta.setdefault("finished", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    write_tables(args.out, results, meta)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
