"""cellrcnn: instance segmentation of cells and nuclei in microscopy images."""

__version__ = "0.1.0"
