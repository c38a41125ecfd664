"""``python -m cellrcnn.evaluation``: folder pairing, errors, JSON output, and agreement with an
independent per-object reference implementation on real label images."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellrcnn.evaluation.__main__ import main
from cellrcnn.io import read_label_image, write_label_image

ISBI_LABELS = Path(__file__).parents[2] / "shared" / "data" / "isbi2012_membrane" / "label"


def blobs(shape=(40, 40), n=4, offset=0) -> np.ndarray:
    lab = np.zeros(shape, np.uint16)
    for k in range(n):
        lab[2 + 9 * k : 8 + 9 * k, 2 + offset : 12 + offset] = k + 1
    return lab


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_missing_prediction_counts_as_empty_and_suffixes(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for name in ("a", "b", "c"):
        write_label_image(gt_dir / f"{name}.tif", blobs())
    pred_dir.mkdir()
    np.save(pred_dir / "a_cp_masks.npy", blobs())  # Cellpose-style name
    Image.fromarray(blobs()).save(pred_dir / "b_pred.png")
    code, out, err = run_main([pred_dir, gt_dir, "--quiet"])
    assert code == 0, err
    res = json.loads(out)
    assert res["n_missing_predictions"] == 1 and "c" in err
    assert res["recall@0.5"] == pytest.approx(8 / 12) and res["precision@0.5"] == 1.0
    assert res["dsb_score"] == pytest.approx(2 / 3)
    assert (res["n_images"], res["n_gt"], res["n_pred"]) == (3, 12, 8)


def test_shape_mismatch_names_the_file(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    write_label_image(gt_dir / "img1.tif", blobs())
    write_label_image(pred_dir / "img1.tif", blobs((40, 41)))
    code, out, err = run_main([pred_dir, gt_dir, "--quiet"])
    assert code == 2 and out == ""
    assert "img1.tif" in err and "(40, 41)" in err


def test_empty_or_missing_gt_folder(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    code, _, err = run_main([tmp_path / "pred", tmp_path / "gt", "--quiet"])
    assert code == 2 and "holds no label images" in err
    code, _, err = run_main([tmp_path / "pred", tmp_path / "nope", "--quiet"])
    assert code == 2 and "does not exist" in err


def test_json_output_and_progress_bar(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    write_label_image(gt_dir / "x.tif", blobs())
    write_label_image(pred_dir / "x_masks.tif", blobs(offset=2))  # IoU 8/12 for every object
    out_json = tmp_path / "out" / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cellrcnn.evaluation", str(pred_dir), str(gt_dir), "--json", str(out_json)],
        capture_output=True,
        text=True,
        check=True,
    )
    printed = json.loads(proc.stdout)
    assert "evaluating" in proc.stderr  # tqdm on stderr, never mixed into the JSON
    written = json.loads(out_json.read_text())
    assert {k: v for k, v in written.items() if k != "per_image"} == printed
    assert written["per_image"][0]["name"] == "x.tif" and written["per_image"][0]["tp"] == 4
    assert printed["f1@0.5"] == 1.0 and printed["f1@0.7"] == 0.0 and printed["pq@0.5"] == pytest.approx(2 / 3)
    assert printed["segm_AP50"] == 1.0 and printed["segm_AP75"] == 0.0


# ----------------------------------------------------------------------------- reference check
def reference_scores(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Straightforward per-object implementation of the same definitions (boolean masks, loops)."""
    gt_ids = [int(i) for i in np.unique(gt) if i != 0]
    pred_ids = [int(j) for j in np.unique(pred) if j != 0]
    ious = {}
    for i in gt_ids:
        gmask = gt == i
        for j in np.unique(pred[gmask]):
            if j == 0:
                continue
            pmask = pred == j
            ious[(i, int(j))] = np.logical_and(gmask, pmask).sum() / np.logical_or(gmask, pmask).sum()

    def counts(t):
        pairs = [(i, j, v) for (i, j), v in ious.items() if v >= t]
        # for t >= 0.5 a pair above threshold is the only one for both objects (no exact halves here)
        assert len({p[0] for p in pairs}) == len(pairs) == len({p[1] for p in pairs})
        tp = len(pairs)
        return tp, len(pred_ids) - tp, len(gt_ids) - tp, sum(p[2] for p in pairs)

    per_t = []
    for k in range(10):
        tp, fp, fn, _ = counts(0.5 + 0.05 * k)
        per_t.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
    g, p = gt > 0, pred > 0
    inter, union, total = (g & p).sum(), (g | p).sum(), g.sum() + p.sum()
    return {
        "dsb": float(np.mean(per_t)),
        "c5": counts(0.5),
        "c7": counts(0.7),
        "dice": 1.0 if total == 0 else 2 * inter / total,
        "jaccard": 1.0 if union == 0 else inter / union,
        "pixel_accuracy": (g == p).mean(),
        "n_gt": len(gt_ids),
        "n_pred": len(pred_ids),
    }


def make_predictions(gt: np.ndarray, kind: int) -> np.ndarray:
    """Perturbed copies of a GT label image: identity, erosion, dilation, shift, drop + merge."""
    from skimage.segmentation import expand_labels, find_boundaries

    if kind == 0:
        return gt.copy()
    if kind == 1:  # erode every object by its inner boundary
        return np.where(find_boundaries(gt, mode="inner"), 0, gt)
    if kind == 2:
        return expand_labels(gt, distance=2)
    if kind == 3:
        return np.roll(gt, (3, -2), axis=(0, 1))
    pred = gt.copy()
    ids = np.unique(gt)[1:]
    pred[np.isin(pred, ids[::4])] = 0  # drop a quarter
    for a, b in zip(ids[1::8], ids[2::8], strict=False):  # merge pairs into one label (one instance)
        pred[pred == b] = a
    return pred * 3 + 7 * (pred > 0)  # non-consecutive labels


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not ISBI_LABELS.is_dir(), reason="../shared/data/isbi2012_membrane is absent")
def test_cli_agrees_with_reference_on_real_labels(tmp_path):
    from scipy import ndimage

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    files = sorted(ISBI_LABELS.glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)[:6]
    assert files, "no label PNGs found"
    refs = []
    for kind, path in enumerate(files):
        gt = ndimage.label(read_label_image(path) == 255)[0]
        write_label_image(gt_dir / f"{path.stem}.tif", gt)
        if kind == 5:  # no prediction file: scored as empty
            pred = np.zeros_like(gt)
        else:
            pred = make_predictions(gt, kind)
            write_label_image(pred_dir / f"{path.stem}{'_cp_masks' if kind % 2 else ''}.tif", pred)
        refs.append(reference_scores(gt, pred))
    out_json = tmp_path / "m.json"
    code, out, err = run_main([pred_dir, gt_dir, "--json", out_json, "--quiet"])
    assert code == 0, err
    got = json.loads(out)

    def pooled(key):
        tp, fp, fn, s = (sum(r[key][i] for r in refs) for i in range(4))
        return tp, fp, fn, s

    tp5, fp5, fn5, s5 = pooled("c5")
    tp7, fp7, fn7, _ = pooled("c7")
    expected = {
        "dsb_score": np.mean([r["dsb"] for r in refs]),
        "f1@0.5": 2 * tp5 / (2 * tp5 + fp5 + fn5),
        "f1@0.7": 2 * tp7 / (2 * tp7 + fp7 + fn7),
        "precision@0.5": tp5 / (tp5 + fp5),
        "recall@0.5": tp5 / (tp5 + fn5),
        "pq@0.5": s5 / (tp5 + 0.5 * fp5 + 0.5 * fn5),
        "dice": np.mean([r["dice"] for r in refs]),
        "jaccard": np.mean([r["jaccard"] for r in refs]),
        "pixel_accuracy": np.mean([r["pixel_accuracy"] for r in refs]),
        "n_gt": sum(r["n_gt"] for r in refs),
        "n_pred": sum(r["n_pred"] for r in refs),
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert 0.3 < got["dsb_score"] < 0.9 and got["n_missing_predictions"] == 1  # a non-trivial mix
    per_image = json.loads(out_json.read_text())["per_image"]
    for row, ref in zip(per_image, refs, strict=True):
        assert row["dsb_score"] == pytest.approx(ref["dsb"], abs=1e-6)
        assert (row["tp"], row["fp"], row["fn"]) == ref["c5"][:3]
