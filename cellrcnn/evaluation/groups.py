"""Results broken down by where images come from: one row per source and per acquisition group
(modality, magnification, stain, preparation), so a researcher sees where a model fails.

Groups come from the COCO image records (converters write ``source`` and, where the source
publishes them, ``modality``, ``magnification``, ``stain``, ``preparation``); an image without a
``modality`` field gets the one its pixels show (:func:`cellrcnn.data.appearance.modality`).
The metrics of a group are computed from the evaluator's per-image records, not re-scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .evaluator import Evaluator

GROUP_FIELDS = ("source", "modality", "magnification", "stain", "preparation")
# the columns of the breakdown table
GROUP_METRICS = ("dsb_score", "f1@0.5", "precision@0.5", "recall@0.5", "pq@0.5", "segm_AP", "dice")


def image_groups(info: Mapping, source: str, raw=None) -> dict[str, str]:
    """The groups of one image: its ``source`` and each acquisition field its record carries;
    the modality from the pixels ``raw`` when the record has none."""
    groups = {"source": str(info.get("source") or source)}
    for field in GROUP_FIELDS[1:]:
        value = info.get(field)
        if value not in (None, ""):
            groups[field] = str(value)
    if "modality" not in groups and raw is not None:
        from ..data.appearance import modality

        groups["modality"] = modality(raw)
    return groups


def breakdown(evaluator: Evaluator, groups_by_image: Mapping[int, Mapping[str, str]]) -> list[dict]:
    """One row per (field, value) with at least one image: ``{"field", "group", "n_images",
    <metrics>}``; fields with a single value across all images are left out (they equal the
    pooled row), except ``source``."""
    rows = []
    for field in GROUP_FIELDS:
        values = {g.get(field) for g in groups_by_image.values()} - {None}
        if not values or (len(values) == 1 and field != "source"):
            continue
        by_group = evaluator.compute_groups(lambda i, f=field: groups_by_image.get(i, {}).get(f))
        for name, metrics in by_group.items():
            rows.append({"field": field, "group": name, **metrics})
    return rows


def breakdown_table(rows: list[dict]) -> str:
    """Markdown table of :func:`breakdown` rows (n/a where a metric is undefined)."""
    if not rows:
        return ""
    head = "| group | images | " + " | ".join(GROUP_METRICS) + " |"
    lines = [head, "|" + "---|" * (len(GROUP_METRICS) + 2)]
    for row in rows:
        cells = []
        for key in GROUP_METRICS:
            value = float(row.get(key, math.nan))
            cells.append("n/a" if math.isnan(value) else f"{value:.3f}")
        lines.append(f"| {row['field']}: {row['group']} | {int(row['n_images'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
