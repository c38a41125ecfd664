"""Converters from public cell/nuclei datasets to COCO (one module per source).

Each source module offers ``convert(src, out, **options) -> Path`` and the constants
``NAME``, ``LICENCE``, ``URL``. ``SOURCES`` maps the command-line names to the modules;
the shared writing, splitting and reporting lives in ``common``.
"""

SOURCES: dict[str, tuple[str, str]] = {
    "bbbc038": ("cellrcnn.data.converters.bbbc038", "2018 Data Science Bowl nuclei (zip/folder of mask PNGs, or RLE CSVs)"),
    "bbbc039": ("cellrcnn.data.converters.bbbc039", "U2OS nuclei, 16-bit TIFF + colour-coded mask PNGs, official splits"),
    "bbbc007": ("cellrcnn.data.converters.bbbc007", "Drosophila Kc167 nuclei and cells from outline drawings"),
    "bbbc009": ("cellrcnn.data.converters.bbbc009", "human red blood cells (DIC) from 1-bit outline TIFFs"),
    "bbbc018": ("cellrcnn.data.converters.bbbc018", "HT29 nuclei and cells from outlines (DIB images)"),
    "cho": ("cellrcnn.data.converters.cho", "CHO cells (BBBC030) or any images/ + outlines/ folder"),
    "bbbc041": ("cellrcnn.data.converters.bbbc041", "P. vivax malaria smears, boxes only, 7 categories"),
    "sartorius": ("cellrcnn.data.converters.sartorius", "Kaggle Sartorius cells, row-major RLE in train.csv"),
    "livecell": ("cellrcnn.data.converters.livecell", "LIVECell COCO, normalised (dict annotations, polygons)"),
    "membrane": ("cellrcnn.data.converters.membrane", "U-Net ISBI 2012 membrane images + binary labels"),
    "folder": ("cellrcnn.data.converters.folder", "images + integer label images (Cellpose, StarDist, _seg.npy)"),
    "monuseg": ("cellrcnn.data.converters.monuseg", "MoNuSeg H&E nuclei: ImageScope XML polygons or per-nucleus PNGs"),
    "sbsst265": ("cellrcnn.data.converters.sbsst265", "S-BSST265 fluorescence nuclei, label TIFFs + acquisition metadata"),
}
