"""``python evaluate.py ckpt_path=... data=...``: score a trained model on one split.

Writes ``metrics.json`` (metrics and per-image rows), ``metrics.md`` (a Markdown table) and
TP/FP/FN overlay PNGs (``overlays/<image stem>.png``) into the run folder.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .evaluation.tables import METRIC_ORDER, metrics_table  # noqa: F401  (importable from here too)


def input_channels(model: torch.nn.Module) -> int:
    """Input channels a trained module expects (``net.in_channels`` of its hyper-parameters)."""
    return int(dict(model.hparams).get("net", {}).get("in_channels", 3))


def input_settings(model: torch.nn.Module) -> dict[str, Any]:
    """``model.input_settings`` (kept for scripts written against this function)."""
    return dict(model.input_settings)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on split ``cfg.split`` of ``cfg.data``; returns the metrics."""
    from hydra.core.hydra_config import HydraConfig

    from .data.masks import masks_to_label_image
    from .data.mixed import ID_STRIDE, image_diameters
    from .data.splits import overlap
    from .evaluation.evaluator import Evaluator
    from .evaluation.groups import breakdown, breakdown_table, image_groups
    from .inference import predict_image
    from .inference.predictor import prediction_fn, set_score_threshold
    from .inference.scale import check_diameter, predict_at_diameter, resolve_diameter
    from .models.postprocess import labels_to_instances
    from .modules.base import load_module
    from .preflight import check_evaluation_data
    from .viz import overlay_tp_fp_fn, save_png

    start = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .api import checkpoint_path

    model = load_module(checkpoint_path(cfg.ckpt_path))  # a file, or a shipped model's name
    model.precision = str(cfg.get("precision") or "auto")
    set_score_threshold(model, cfg.get("score_threshold"))
    datamodule = instantiate(cfg.data, **input_settings(model))
    datamodule.prepare_data()
    check_evaluation_data(datamodule, str(cfg.split))
    sets = datamodule.eval_sets(cfg.split)  # one per source

    diameter = resolve_diameter(cfg.get("diameter"), getattr(model, "default_diameter", None))
    check_diameter(None if diameter == "gt" else diameter, model.object_diameter, str(cfg.ckpt_path))

    def predict_native(raw, quick: bool = False):  # the whole image at once, as predict_instances does
        return predict_image(raw, prediction_fn(model, quick), tile_size=max(raw.shape[:2]), overlap=0,
                             progress=False, **input_settings(model))

    evaluator = Evaluator(iou_thresholds=tuple(getattr(model.evaluator, "iou_thresholds", (0.5, 0.7))),
                          extra_metrics=bool(cfg.get("extra_metrics", False)))
    groups: dict[int, dict[str, str]] = {}
    seen_in_training: list[str] = []
    n_images = 0
    for k, (source, dataset, _) in enumerate(sets):
        known = overlap([dataset.image_path(i) for i in range(len(dataset))], getattr(model, "training_images", []))
        seen_in_training += [str(path) for path in known]
        annotated = image_diameters(dataset) if diameter == "gt" else None
        for i in range(len(dataset)):
            image, target = dataset[i]
            target = {**target, "image_id": int(target["image_id"]) + k * ID_STRIDE}
            raw = dataset.load_raw(i)
            if diameter is None or (diameter == "gt" and not np.isfinite(annotated[i])):
                pred = model.predict_instances([image])[0]
            else:  # "gt": each image at the size its annotations say, as a user who knows it would
                wanted = float(annotated[i]) if diameter == "gt" else diameter
                labels, scores, _ = predict_at_diameter(raw, predict_native, wanted, model.object_diameter,
                                                        functools.partial(predict_native, quick=True),
                                                        getattr(model, "training_profile", None))
                pred = labels_to_instances(labels, scores)
            evaluator.update(target, pred)
            groups[target["image_id"]] = image_groups(dataset.image_info(i), source, raw)
            if n_images < int(cfg.get("overlays", 0)):
                gt = masks_to_label_image(target["masks"].numpy())
                pr = masks_to_label_image(pred["masks"].numpy(), pred["scores"].numpy())
                stem = Path(dataset.image_info(i)["file_name"]).stem
                save_png(out_dir / "overlays" / f"{source}_{stem}.png", overlay_tp_fp_fn(image, gt, pr))
            n_images += 1
    metrics = evaluator.compute()
    rows = breakdown(evaluator, groups)
    names = ", ".join(f"{source} {dataset.annotation_file}" for source, dataset, _ in sets)
    table = metrics_table(metrics, f"{Path(cfg.ckpt_path).name} on {names}")
    if len(rows) > 1:
        table += "\n\n**By source and acquisition group**\n\n" + breakdown_table(rows)
    if seen_in_training:
        warning = (f"warning: {len(seen_in_training)} of {n_images} images were in this checkpoint's training "
                   "set; these scores are optimistic (score held-out images, e.g. split=test)")
        table = warning + "\n\n" + table
    result = {"checkpoint": str(cfg.ckpt_path), "annotations": [str(d.annotation_file) for _, d, _ in sets],
              "diameter": diameter, "metrics": metrics, "by_group": rows, "seen_in_training": seen_in_training}
    (out_dir / "metrics.json").write_text(json.dumps({**result, "per_image": evaluator.per_image}, indent=1, default=float))
    (out_dir / "metrics.md").write_text(table + "\n")
    print(table)
    print(f"\n{n_images} images in {time.perf_counter() - start:.1f} s; results in {out_dir}")
    return metrics


if __name__ == "__main__":  # python -m cellrcnn.evaluate
    from cellrcnn.cli import evaluate as main

    main()
