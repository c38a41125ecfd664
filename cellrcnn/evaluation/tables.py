"""Metric tables for people: the Markdown table that training, ``cellrcnn evaluate`` and the
benchmarks print and write next to their JSON."""

from __future__ import annotations

import math

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
