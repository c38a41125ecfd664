"""Shape-anomaly flags: irregular objects (stars, rods) among round cells score high."""

from __future__ import annotations

import time

import numpy as np
import pytest
from skimage.draw import ellipse, polygon

from cellrcnn.inference.anomaly import AnomalyModel, fit_anomaly_model, score_anomalies
from cellrcnn.inference.measurements import measure


@pytest.fixture(scope="module")
def population():
    """~560 round-ish cells (radius 10-16 px, axis ratio 0.75-1) plus 12 five-pointed stars and
    12 thin rods, on a grid; returns (measurement table, kind per label)."""
    rng = np.random.default_rng(0)
    size, step = 1440, 60
    labels = np.zeros((size, size), np.int32)
    centres = [(y, x) for y in range(30, size, step) for x in range(30, size, step)]
    order = rng.permutation(len(centres))
    kinds = {}
    for k, i in enumerate(order, start=1):
        y, x = centres[i]
        if k <= 12:
            angles = np.linspace(0, 2 * np.pi, 10, endpoint=False) + rng.uniform(0, 1)
            radius = np.where(np.arange(10) % 2 == 0, 25, 9)
            rr, cc = polygon(y + radius * np.sin(angles), x + radius * np.cos(angles), labels.shape)
            kinds[k] = "star"
        elif k <= 24:
            rr, cc = ellipse(y, x, 4, 27, labels.shape, rotation=rng.uniform(0, np.pi))
            kinds[k] = "rod"
        else:
            r = rng.uniform(10, 16)
            rr, cc = ellipse(y, x, r, r * rng.uniform(0.75, 1), labels.shape, rotation=rng.uniform(0, np.pi))
            kinds[k] = "cell"
        labels[rr, cc] = k
    table = measure(labels, image_name="population")
    return table, table["label"].map(kinds).to_numpy()


def test_irregular_shapes_score_above_regular_ones(population):
    table, kind = population
    start = time.perf_counter()
    model = fit_anomaly_model(table, seed=0)
    assert time.perf_counter() - start < 30  # about a second on one core
    scored = score_anomalies(model, table)
    score = scored["anomaly_score"].to_numpy()
    cells, odd = score[kind == "cell"], score[kind != "cell"]
    assert odd.min() > np.percentile(cells, 99)
    assert scored["is_anomalous"][kind != "cell"].all()
    assert scored["is_anomalous"][kind == "cell"].mean() < 0.02
    assert np.median(cells) == pytest.approx(0, abs=0.5)  # robust z: typical cells near 0


def test_deterministic_under_a_seed_and_save_load_round_trip(population, tmp_path):
    table, _ = population
    a = score_anomalies(fit_anomaly_model(table, seed=3), table)["anomaly_score"]
    model = fit_anomaly_model(table, seed=3)
    b = score_anomalies(model, table)["anomaly_score"]
    np.testing.assert_array_equal(a, b)
    loaded = AnomalyModel.load(model.save(tmp_path / "shape_model.pt"))
    np.testing.assert_allclose(score_anomalies(loaded, table)["anomaly_score"], b, rtol=1e-6)
    assert loaded.columns == model.columns and loaded.threshold == model.threshold


def test_threshold_units_and_errors(population, tmp_path):
    table, kind = population
    model = fit_anomaly_model(table, seed=0)
    lax = score_anomalies(model, table, threshold=1e9)
    assert not lax["is_anomalous"].any()
    assert len(score_anomalies(model, table.iloc[:0])) == 0
    um = table.rename(columns={"area_px": "area_um2"})
    with pytest.raises(KeyError, match="area_px"):
        score_anomalies(model, um)  # a pixel-unit model refuses a micrometre table
    with pytest.raises(ValueError, match="at least 10"):
        fit_anomaly_model(table.iloc[:5])
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.pt"):
        AnomalyModel.load(tmp_path / "bad.pt")
