"""Shape-anomaly flags: cells whose outline does not look like the rest of the population.

Before statistics on a measurement table, researchers remove what is not a single healthy cell:
clumps the model failed to split, debris, cut or torn outlines. An autoencoder trained on the
population's shape descriptors reconstructs typical cells well and unusual ones badly; the
reconstruction error, standardised robustly, is the anomaly score.

Why descriptors rather than resized mask crops: they come straight from the table of
:func:`cellrcnn.inference.measurements.measure` (so a CSV from an earlier run, or from another
tool with the same columns, can be scored without images), the fit takes a second on CPU for
tens of thousands of cells, and a flag can be explained by the descriptor that is off. Crops would
see finer outline detail but need the label images, a CNN and minutes of training.

Descriptors (robustly standardised by median and IQR): log area, log perimeter, log aspect ratio,
eccentricity, solidity, circularity. Area is included so that objects far larger or smaller than
typical (merged clumps, debris) are flagged too; pass ``features=`` to leave it out.
Score: ``anomaly_score`` = robust z-score (median / 1.4826·MAD over the fitting set) of the log
reconstruction error; ``is_anomalous`` = score > threshold (default 3). Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

DEFAULT_FEATURES = ("area", "perimeter", "aspect_ratio", "eccentricity", "solidity", "circularity")
_LOG = {"area", "perimeter", "aspect_ratio"}  # positive, skewed: compare ratios, not differences
_UNIT_SUFFIXES = {"area": ("_px", "_um2"), "perimeter": ("_px", "_um")}


def _resolve(table: pd.DataFrame, name: str) -> str:
    """Table column for a descriptor: ``area`` -> ``area_px`` or ``area_um2``."""
    for suffix in ("", *_UNIT_SUFFIXES.get(name, ())):
        if name + suffix in table.columns:
            return name + suffix
    raise KeyError(f"the measurement table has no {name!r} column (columns: {list(table.columns)})")


def _features(table: pd.DataFrame, columns: list[str]) -> np.ndarray:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(f"the table lacks {missing}, which the anomaly model was fitted on "
                       "(a model fitted on pixel units needs a table in pixel units, and vice versa)")
    x = table[columns].to_numpy(dtype=np.float64, copy=True)
    for j, c in enumerate(columns):
        if any(c.startswith(base) for base in _LOG):
            x[:, j] = np.log(np.clip(x[:, j], 1e-6, 1e6))
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: a 6-16-3 network gains nothing from more, and on a busy machine
    thread synchronisation made a 9,000-cell fit 10× slower (25 s instead of 2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _autoencoder(n_in: int, hidden: int, bottleneck: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, bottleneck), nn.Tanh(),
        nn.Linear(bottleneck, hidden), nn.Tanh(), nn.Linear(hidden, n_in),
    )


@dataclass
class AnomalyModel:
    """A fitted shape autoencoder with its standardisation and score reference."""

    columns: list[str]
    center: np.ndarray  # per-feature median
    scale: np.ndarray  # per-feature IQR / 1.349 (floored)
    net: nn.Module
    err_median: float = 0.0  # of log reconstruction error over the fitting set
    err_scale: float = 1.0  # 1.4826 * MAD of the same
    threshold: float = 3.0
    hidden: int = 16
    bottleneck: int = 3
    meta: dict = field(default_factory=dict)

    def _log_error(self, table: pd.DataFrame) -> np.ndarray:
        z = (_features(table, self.columns) - self.center) / self.scale
        with torch.no_grad(), _one_thread():
            x = torch.from_numpy(z.astype(np.float32))
            err = ((self.net(x) - x) ** 2).mean(dim=1).numpy().astype(np.float64)
        return np.log(err + 1e-6)

    def save(self, path: str | Path) -> Path:
        """Write the model as a small torch file (loadable with ``weights_only=True``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "columns": self.columns, "center": self.center.tolist(), "scale": self.scale.tolist(),
            "state_dict": self.net.state_dict(), "err_median": self.err_median, "err_scale": self.err_scale,
            "threshold": self.threshold, "hidden": self.hidden, "bottleneck": self.bottleneck,
            "meta": self.meta,
        }, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> AnomalyModel:
        """Read a model written by :meth:`save`."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
            net = _autoencoder(len(state["columns"]), state["hidden"], state["bottleneck"])
            net.load_state_dict(state["state_dict"])
        except Exception as exc:
            raise ValueError(f"{path}: not an anomaly model written by AnomalyModel.save ({exc})") from exc
        net.eval()
        return cls(columns=list(state["columns"]), center=np.asarray(state["center"]),
                   scale=np.asarray(state["scale"]), net=net, err_median=state["err_median"],
                   err_scale=state["err_scale"], threshold=state["threshold"], hidden=state["hidden"],
                   bottleneck=state["bottleneck"], meta=dict(state["meta"]))


def fit_anomaly_model(
    table: pd.DataFrame,
    features: tuple[str, ...] = DEFAULT_FEATURES,
    hidden: int = 16,
    bottleneck: int = 3,
    epochs: int = 300,
    lr: float = 1e-2,
    max_rows: int = 50_000,
    threshold: float = 3.0,
    seed: int = 0,
) -> AnomalyModel:
    """Fit the autoencoder on a measurement table (rows = cells, ideally many images pooled).

    Full-batch Adam on at most ``max_rows`` rows (a fixed random subset above that), inputs
    clipped to ±5 robust SD while fitting so a few extreme objects do not pull the model towards
    them. Takes about a second for 10,000 cells on one CPU core.
    """
    table = table.reset_index(drop=True)
    if len(table) < 10:
        raise ValueError(f"fitting an anomaly model needs at least 10 objects, got {len(table)}")
    columns = [_resolve(table, f) for f in features]
    rng = np.random.default_rng(seed)
    if len(table) > max_rows:
        table = table.iloc[np.sort(rng.choice(len(table), max_rows, replace=False))]
    x = _features(table, columns)
    center = np.median(x, axis=0)
    q75, q25 = np.percentile(x, [75, 25], axis=0)
    # floor the spread: a descriptor that barely varies (solidity of convex cells) must not turn
    # rounding noise into huge z-scores
    scale = np.maximum((q75 - q25) / 1.349, np.maximum(0.02 * np.abs(center), 1e-3))
    z = torch.from_numpy(np.clip((x - center) / scale, -5, 5).astype(np.float32))
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        net = _autoencoder(len(columns), hidden, bottleneck)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for _ in range(epochs):
            opt.zero_grad()
            loss = ((net(z) - z) ** 2).mean()
            loss.backward()
            opt.step()
    net.eval()
    model = AnomalyModel(columns=columns, center=center, scale=scale, net=net, threshold=threshold,
                         hidden=hidden, bottleneck=bottleneck,
                         meta={"n_fit": len(table), "seed": seed, "final_loss": float(loss.detach())})
    log_err = model._log_error(table)
    model.err_median = float(np.median(log_err))
    model.err_scale = float(max(1.4826 * np.median(np.abs(log_err - model.err_median)), 1e-6))
    return model


def score_anomalies(model: AnomalyModel, table: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """Copy of ``table`` with ``anomaly_score`` (robust z of the reconstruction error) and
    ``is_anomalous`` (score > ``threshold``, default the model's)."""
    out = table.copy()
    threshold = model.threshold if threshold is None else threshold
    if len(out) == 0:
        out["anomaly_score"], out["is_anomalous"] = np.zeros(0), np.zeros(0, bool)
        return out
    out["anomaly_score"] = (model._log_error(out) - model.err_median) / model.err_scale
    out["is_anomalous"] = out["anomaly_score"] > threshold
    return out
