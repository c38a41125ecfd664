"""``python predict.py [ckpt_path=...] input=FILE_OR_DIR output=DIR``: segment images.

Per image ``<stem>.tif`` (label image, uint16; uint32 above 65,535 objects) and, when asked,
``<stem>_overlay.png``; for the whole run ``coco_results.json`` (COCO results, ``image_id`` as in
``predictions.json``), ``predictions.json`` (images, object counts, skipped files) and with
``measure=true`` ``measurements.csv`` (one row per cell). Large images are predicted in
overlapping tiles. A file that cannot be read is reported by name and skipped; the other images
of a folder are still processed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from .io import IMAGE_SUFFIXES, ImageReadError, prepare_image, read_image, to_channels

SHIPPED_CHECKPOINT = Path(__file__).parent / "weights" / "nuclei.ckpt"


def resolve_checkpoint(ckpt_path: str | Path | None) -> Path:
    """``ckpt_path``, or the shipped model when None; a clear error when there is neither."""
    if ckpt_path:
        return Path(ckpt_path)
    if SHIPPED_CHECKPOINT.is_file():
        return SHIPPED_CHECKPOINT
    raise FileNotFoundError(
        f"no ckpt_path given and no shipped model at {SHIPPED_CHECKPOINT}; "
        "pass ckpt_path=path/to/model.ckpt (written by train.py under outputs/<experiment>/.../checkpoints/)"
    )


def input_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """(candidate images, other files) of a file or folder; hidden files are ignored."""
    path = Path(path)
    if path.is_file():
        return [path], []
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in files if p not in images]


def model_input(raw: np.ndarray, channels: int, tile_size: int) -> np.ndarray:
    """C×H×W model input: normalised float for images that fit one tile (exactly as in training);
    raw integers for larger ones, which the tiler normalises once with whole-image percentiles."""
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    if max(raw.shape[:2]) <= tile_size or raw.dtype.kind == "f":
        return prepare_image(raw, channels)
    return np.ascontiguousarray(np.moveaxis(to_channels(raw, channels), -1, 0))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image of ``cfg.input`` into ``cfg.output``; returns the summary dict."""
    from .evaluate import input_channels, set_score_threshold
    from .inference import (
        coco_results,
        measure,
        predict_tiled,
        write_coco_results,
        write_overlay_png,
        write_table,
    )
    from .io import write_label_image
    from .modules.base import load_module

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"))
    model = load_module(ckpt_path)
    set_score_threshold(model, cfg.get("score_threshold"))
    channels = input_channels(model)
    images, others = input_files(cfg.input)  # a lone file is tried whatever its suffix

    summary: dict[str, Any] = {"checkpoint": str(ckpt_path), "images": [], "skipped": []}
    results, tables, stems = [], [], set()
    for path in images:
        try:
            raw = read_image(path)
        except ImageReadError as exc:
            if Path(cfg.input).is_file():
                raise  # a single input: the error (naming the file) is the answer
            summary["skipped"].append({"file": str(path), "error": str(exc)})
            print(f"skipped {exc}")
            continue
        image = model_input(raw, channels, int(cfg.tile_size))
        labels, scores = predict_tiled(
            image, model.predict_instances, int(cfg.tile_size), int(cfg.tile_overlap), progress=False, channels=channels
        )
        stem = path.stem if path.stem not in stems else f"{path.stem}_{path.suffix.lstrip('.')}"
        stems.add(stem)
        image_id = len(summary["images"]) + 1
        write_label_image(out / f"{stem}.tif", labels)
        objects = coco_results(labels, image_id, scores)
        results += objects
        if cfg.get("overlays", True):
            write_overlay_png(out / f"{stem}_overlay.png", raw, labels)
        if cfg.get("measure", False):
            tables.append(measure(labels, raw, path.name, scores, cfg.get("pixel_size")))
        n = len(objects)
        summary["images"].append({"id": image_id, "file": str(path), "labels": f"{stem}.tif", "height": int(labels.shape[0]),
                                  "width": int(labels.shape[1]), "n_objects": n})
        print(f"{path.name}: {n} objects -> {out / (stem + '.tif')}")
    write_coco_results(out / "coco_results.json", results)
    if tables:
        import pandas as pd

        write_table(pd.concat(tables, ignore_index=True), out / "measurements.csv")
    summary["ignored"] = [str(p) for p in others]
    (out / "predictions.json").write_text(json.dumps(summary, indent=1))
    if summary["skipped"]:
        print(f"{len(summary['skipped'])} file(s) could not be read and were skipped:")
        for s in summary["skipped"]:
            print(f"  {s['error']}")
    return summary
