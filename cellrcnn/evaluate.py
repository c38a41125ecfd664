"""``python evaluate.py ckpt_path=... data=...``: score a trained model on one split.

Writes ``metrics.json`` (metrics and per-image rows), ``metrics.md`` (a Markdown table) and
TP/FP/FN overlay PNGs (``overlays/<image stem>.png``) into the run folder.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

# metric order of the tables (DESIGN.md names); anything else follows alphabetically
METRIC_ORDER = (
    "dsb_score", "segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "f1@0.5", "f1@0.7",
    "precision@0.5", "recall@0.5", "pq@0.5", "dice", "jaccard", "pixel_accuracy",
    "n_images", "n_gt", "n_pred",
)  # fmt: skip


def metrics_table(metrics: dict[str, float], title: str | None = None) -> str:
    """A two-column Markdown table of ``{metric: value}`` (counts as integers, nan as "n/a")."""
    keys = [k for k in METRIC_ORDER if k in metrics] + sorted(k for k in metrics if k not in METRIC_ORDER)
    lines = [f"**{title}**", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for k in keys:
        v = float(metrics[k])
        text = "n/a" if math.isnan(v) else (f"{int(v)}" if k.startswith("n_") else f"{v:.4f}")
        lines.append(f"| {k} | {text} |")
    return "\n".join(lines)


def input_channels(model: torch.nn.Module) -> int:
    """Input channels a trained module expects (``net.in_channels`` of its hyper-parameters)."""
    return int(dict(model.hparams).get("net", {}).get("in_channels", 3))


def input_settings(model: torch.nn.Module) -> dict[str, Any]:
    """How images are prepared for a trained module: keyword arguments of
    :func:`cellrcnn.io.prepare_image`, ``CocoInstanceDataset`` and ``predict_image``."""
    return {"channels": input_channels(model), "invert_bright": bool(getattr(model, "invert_bright", False))}


def set_score_threshold(model: torch.nn.Module, threshold: float | None) -> None:
    """Override a module's detection score threshold (modules without one are left as they are)."""
    if threshold is None:
        return
    if not hasattr(model, "score_threshold"):
        raise ValueError(f"{type(model).__name__} has no score threshold to override")
    model.score_threshold = float(threshold)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on split ``cfg.split`` of ``cfg.data``; returns the metrics."""
    from hydra.core.hydra_config import HydraConfig

    from .data.coco import CocoInstanceDataset
    from .data.masks import masks_to_label_image
    from .evaluation.evaluator import Evaluator
    from .inference import predict_image
    from .inference.scale import check_diameter, predict_at_diameter
    from .models.postprocess import labels_to_instances
    from .modules.base import load_module
    from .viz import overlay_tp_fp_fn, save_png

    start = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    model = load_module(cfg.ckpt_path)
    set_score_threshold(model, cfg.get("score_threshold"))
    datamodule = instantiate(cfg.data, **input_settings(model))
    datamodule.prepare_data()
    annotations = datamodule.annotation_file(cfg.split)
    dataset = CocoInstanceDataset(annotations, image_root=datamodule.root / "images", **input_settings(model))

    diameter = cfg.get("diameter")
    check_diameter(diameter, model.object_diameter, str(cfg.ckpt_path))

    def predict_native(raw):  # the whole image at once, as predict_instances on the dataset's image
        return predict_image(raw, model.predict_instances, tile_size=max(raw.shape[:2]), overlap=0, progress=False,
                             **input_settings(model))

    evaluator = Evaluator(iou_thresholds=tuple(getattr(model.evaluator, "iou_thresholds", (0.5, 0.7))))
    for i in range(len(dataset)):
        image, target = dataset[i]
        if diameter is None:
            pred = model.predict_instances([image])[0]
        else:
            labels, scores, _ = predict_at_diameter(dataset.load_raw(i), predict_native, diameter, model.object_diameter)
            pred = labels_to_instances(labels, scores)
        evaluator.update(target, pred)
        if i < int(cfg.get("overlays", 0)):
            gt = masks_to_label_image(target["masks"].numpy())
            pr = masks_to_label_image(pred["masks"].numpy(), pred["scores"].numpy())
            stem = Path(dataset.image_info(i)["file_name"]).stem
            save_png(out_dir / "overlays" / f"{stem}.png", overlay_tp_fp_fn(image, gt, pr))
    metrics = evaluator.compute()
    title = f"{Path(cfg.ckpt_path).name} on {annotations}"
    table = metrics_table(metrics, title)
    result = {"checkpoint": str(cfg.ckpt_path), "annotations": str(annotations), "diameter": diameter, "metrics": metrics}
    (out_dir / "metrics.json").write_text(json.dumps({**result, "per_image": evaluator.per_image}, indent=1, default=float))
    (out_dir / "metrics.md").write_text(table + "\n")
    print(table)
    print(f"\n{len(dataset)} images in {time.perf_counter() - start:.1f} s; results in {out_dir}")
    return metrics


if __name__ == "__main__":  # python -m cellrcnn.evaluate
    from cellrcnn.cli import evaluate as main

    main()
