"""From a trained model to researcher outputs: tiled prediction of large images, per-cell
measurements, shape-anomaly flags, and exports (label TIFF, COCO results, QuPath GeoJSON,
ImageJ ROIs, overlay PNGs).

The names below are imported on first use: prediction loads only the submodules it needs
(measurements and anomaly scores bring pandas, which a plain prediction never touches).
"""

import importlib

_WHERE = {
    "AnomalyModel": "anomaly", "fit_anomaly_model": "anomaly", "score_anomalies": "anomaly",
    "coco_results": "exports", "to_geojson": "exports", "write_coco_results": "exports",
    "write_exports": "exports", "write_geojson": "exports", "write_imagej_rois": "exports",
    "write_label_tiff": "exports", "write_overlay_png": "exports",
    "measure": "measurements", "summarize": "measurements", "write_table": "measurements",
    "TiledPrediction": "tiling", "estimate_percentiles": "tiling", "predict_fn_from_label_fn": "tiling",
    "predict_image": "tiling", "predict_tiled": "tiling",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
