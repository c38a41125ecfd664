"""From a trained model to researcher outputs: tiled prediction of large images, per-cell
measurements, shape-anomaly flags, and exports (label TIFF, COCO results, QuPath GeoJSON,
ImageJ ROIs, overlay PNGs)."""

from cellrcnn.inference.anomaly import AnomalyModel, fit_anomaly_model, score_anomalies
from cellrcnn.inference.exports import (
    coco_results,
    to_geojson,
    write_coco_results,
    write_exports,
    write_geojson,
    write_imagej_rois,
    write_label_tiff,
    write_overlay_png,
)
from cellrcnn.inference.measurements import measure, summarize, write_table
from cellrcnn.inference.tiling import (
    TiledPrediction,
    estimate_percentiles,
    predict_fn_from_label_fn,
    predict_image,
    predict_tiled,
)

__all__ = [
    "AnomalyModel", "TiledPrediction", "coco_results", "estimate_percentiles", "fit_anomaly_model", "measure",
    "predict_fn_from_label_fn", "predict_image", "predict_tiled", "score_anomalies", "summarize", "to_geojson",
    "write_coco_results", "write_exports", "write_geojson", "write_imagej_rois", "write_label_tiff",
    "write_overlay_png", "write_table",
]
