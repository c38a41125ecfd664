"""``python predict.py [ckpt_path=...] input=FILE_OR_DIR output=DIR``: segment images.

Per image ``<stem>.tif`` (label image, uint16; uint32 above 65,535 objects), ``<stem>_overlay.png``
and the ``exports`` asked for (``geojson``: QuPath polygons, ``imagej``: Fiji ROI zip); for the
whole run ``coco_results.json`` (COCO results, ``image_id`` as in ``predictions.json``),
``predictions.json`` (images, object counts, skipped files) and with ``measure=true``
``measurements.csv`` (one row per cell, ``anomaly=true`` adds shape-anomaly scores) and
``summary.csv`` (per image). Images larger than ``tile_size`` are predicted in overlapping tiles. A file that cannot be read is reported by name and skipped; the other images
of a folder are still processed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .io import IMAGE_SUFFIXES, ImageReadError, atomic_write, protect_inputs, read_image

SHIPPED_CHECKPOINT = Path(__file__).parent / "weights" / "nuclei.ckpt"
MIN_CELLS_FOR_ANOMALY = 30  # fewer cells cannot define what a typical shape is
log = logging.getLogger(__name__)


def say(message: str) -> None:
    """Print a line of the run's report, and keep it in the run's log file (``predict.log``; the
    predict config keeps the log's console handler for warnings, so nothing prints twice)."""
    print(message)
    log.info(message)


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


def write_measurements(out: Path, tables: list, shapes: dict[str, tuple[int, int]], cfg: DictConfig):
    """``measurements.csv`` (or .parquet with ``table_format=parquet``): one row per cell, with
    ``anomaly_score`` / ``is_anomalous`` from a shape autoencoder fitted on this run's cells when
    ``anomaly=true``; ``summary.csv``: count, mean area and density per image (zero-cell images included)."""
    import pandas as pd

    from .inference import fit_anomaly_model, score_anomalies, summarize, write_table

    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["image", "label", "area_px"])
    if cfg.get("anomaly") and len(table) >= MIN_CELLS_FOR_ANOMALY:
        model = fit_anomaly_model(table)
        table = score_anomalies(model, table)
        model.save(out / "shape_anomaly_model.pt")
    elif cfg.get("anomaly"):
        say(f"anomaly=true needs at least {MIN_CELLS_FOR_ANOMALY} cells to learn typical shapes; found {len(table)}")
    suffix = ".parquet" if cfg.get("table_format") == "parquet" else ".csv"
    write_table(table, out / f"measurements{suffix}")
    write_table(summarize(table, image_shapes=shapes, pixel_size=cfg.get("pixel_size")), out / f"summary{suffix}")
    return table


def flag_anomalies_in_exports(out: Path, images: list[dict], table, formats: set[str]) -> None:
    """Rewrite the GeoJSON / ROI exports with the anomaly flags, which exist only once the shape
    model has seen every image's cells (the label images are read back from ``<stem>.tif``)."""
    from .inference import write_exports
    from .io import read_label_image

    for entry in images:
        rows = table[table["image"] == Path(entry["file"]).name]
        labels = read_label_image(out / entry["labels"])
        write_exports(out, Path(entry["labels"]).stem, labels, formats=tuple(sorted(formats)), measurements=rows)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image of ``cfg.input`` into ``cfg.output``; returns the summary dict."""
    from .api import Segmenter
    from .inference.exports import coco_results, free_stem, write_coco_results, write_exports
    from .inference.scale import check_diameter

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"))
    # the model with its input preparation, object size, tiling and thresholds (cellrcnn.api);
    # without ckpt_path a shipped model, by default the one that suits each image (model=auto)
    options = {"tile_size": cfg.get("tile_size"), "tile_overlap": int(cfg.tile_overlap),
               "score_threshold": cfg.get("score_threshold"), "tta": cfg.get("tta"),
               "precision": str(cfg.get("precision") or "auto")}
    if cfg.get("ckpt_path"):
        segmenter = Segmenter.from_checkpoint(ckpt_path, **options)
    else:
        segmenter = Segmenter.from_pretrained(str(cfg.get("model") or "auto"), **options)
    check_diameter(cfg.get("diameter"), segmenter.object_diameter, str(ckpt_path))
    images, others = input_files(cfg.input)  # a lone file is tried whatever its suffix
    protect_inputs([*images, *others])  # no output may replace an input (same folder, symlinks)

    summary: dict[str, Any] = {"checkpoint": str(cfg.get("ckpt_path") or ckpt_path), "model": segmenter.name,
                               "images": [], "skipped": []}
    results, tables, stems, shapes = [], [], set(), {}
    for path in images:
        try:
            raw = read_image(path, channel=cfg.get("channel"), plane=cfg.get("plane"))
        except ImageReadError as exc:
            if Path(cfg.input).is_file():
                raise  # a single input: the error (naming the file) is the answer
            summary["skipped"].append({"file": str(path), "error": str(exc)})
            say(f"skipped {exc}")
            continue
        result = segmenter.segment(raw, diameter=cfg.get("diameter"), name=path.name, progress=True)
        labels, scores, scaling = result.labels, result.scores, result.info
        for reason in scaling.get("warnings", []):  # the count of such an image needs a look
            say(f"{path.name}: do not trust this result blindly: {reason}")
        if scaling["factor"] != 1.0:
            # diameter=shrink or auto measured the objects; diameter=<px> is the user's word for it
            given = scaling["diameter"] if isinstance(scaling["diameter"], int | float) else None
            measured = scaling.get("measured_diameter") or given
            sizes = (f"objects of {measured:.0f} px median diameter brought to {measured * scaling['factor']:.0f} px"
                     if measured else "objects brought to the model's size")
            say(f"{path.name}: predicted at {scaling['factor']:g}x size ({sizes})")
        stem = free_stem(out, path.stem if path.stem not in stems else f"{path.stem}_{path.suffix.lstrip('.')}", stems)
        stems.add(stem)
        image_id = len(summary["images"]) + 1
        objects = coco_results(labels, image_id, scores)
        results += objects
        table = None
        if cfg.get("measure"):  # pandas and scikit-image's region properties only when asked for
            from .inference.measurements import measure

            table = measure(labels, raw, path.name, scores, cfg.get("pixel_size"))
        if table is not None:
            tables.append(table)
        formats = ("tiff", *cfg.get("exports", ()), *(("overlay",) if cfg.get("overlays", True) else ()))
        write_exports(out, stem, labels, image_raw=raw, scores=scores, formats=formats, measurements=table)
        shapes[path.name] = labels.shape
        n = len(objects)
        summary["images"].append({"id": image_id, "file": str(path), "labels": f"{stem}.tif", "height": int(labels.shape[0]),
                                  "width": int(labels.shape[1]), "n_objects": n, **scaling})
        say(f"{path.name}: {n} objects -> {out / (stem + '.tif')}")
    if not cfg.get("ckpt_path"):  # the shipped model(s) that predicted, not just the default one
        used = sorted({entry["checkpoint"] for entry in summary["images"]})
        summary["checkpoint"] = ", ".join(used) or summary["checkpoint"]
    write_coco_results(out / "coco_results.json", results)
    if cfg.get("measure"):
        table = write_measurements(out, tables, shapes, cfg)
        if "is_anomalous" in table and {"geojson", "imagej"} & set(cfg.get("exports") or ()):
            flag_anomalies_in_exports(out, summary["images"], table, {"geojson", "imagej"} & set(cfg.exports))
    summary["ignored"] = [str(p) for p in others]
    atomic_write(out / "predictions.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    if summary["skipped"]:
        say(f"{len(summary['skipped'])} file(s) could not be read and were skipped:")
        for s in summary["skipped"]:
            say(f"  {s['error']}")
    if images and not summary["images"]:  # nothing was predicted: a failed run, not a success
        # the command line prints this without a traceback and exits non-zero
        raise ImageReadError(f"all {len(images)} input file(s) of {cfg.input} were skipped (see above)")
    protect_inputs([])  # the inputs of this run are no longer this thread's to guard
    return summary


if __name__ == "__main__":  # python -m cellrcnn.predict
    from cellrcnn.cli import predict as main

    main()
