"""Results per source and acquisition group, from the evaluator's per-image records."""

import numpy as np
import pytest

from cellrcnn.data.appearance import modality
from cellrcnn.evaluation.evaluator import Evaluator
from cellrcnn.evaluation.groups import breakdown, breakdown_table, image_groups


def _labels(n: int) -> np.ndarray:
    lab = np.zeros((40, 40), np.int32)
    for k in range(n):
        lab[2 + 8 * k : 7 + 8 * k, 5:12] = k + 1
    return lab


def test_each_group_is_scored_on_its_own_images():
    ev = Evaluator(coco=False)
    ev.update_labels(_labels(3), _labels(3), image_id=1)  # perfect
    ev.update_labels(_labels(2), _labels(2), image_id=2)  # perfect
    ev.update_labels(_labels(4), np.zeros((40, 40), np.int32), image_id=3)  # everything missed
    groups = {1: {"source": "a", "modality": "fluorescence"}, 2: {"source": "a", "modality": "H&E"},
              3: {"source": "b", "modality": "H&E"}}
    rows = {(r["field"], r["group"]): r for r in breakdown(ev, groups)}
    assert rows[("source", "a")]["dsb_score"] == 1.0 and rows[("source", "a")]["n_images"] == 2
    assert rows[("source", "b")]["dsb_score"] == 0.0 and rows[("source", "b")]["recall@0.5"] == 0.0
    assert rows[("modality", "H&E")]["dsb_score"] == pytest.approx(0.5)
    assert rows[("modality", "H&E")]["f1@0.5"] == pytest.approx(2 * 2 / (2 * 2 + 4))  # 2 TP, 4 FN pooled
    assert "| source: b | 1 |" in breakdown_table(list(rows.values()))


def test_groups_come_from_the_record_else_from_the_pixels():
    he = np.zeros((20, 20, 3), np.uint8) + np.array([230, 200, 220], np.uint8)
    he[5:10, 5:10] = (90, 40, 140)
    assert modality(he) == "H&E"
    info = {"source": "monuseg", "stain": "H&E", "magnification": "40x"}
    assert image_groups(info, "x", he) == {"source": "monuseg", "stain": "H&E", "magnification": "40x",
                                           "modality": "H&E"}
    dark = np.zeros((20, 20), np.uint16)
    dark[5:10, 5:10] = 4000
    assert image_groups({"modality": "fluorescence"}, "dsb", dark) == {"source": "dsb", "modality": "fluorescence"}
    assert image_groups({}, "dsb", dark)["modality"] == "fluorescence"
