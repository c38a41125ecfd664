"""cellrcnn: instance segmentation of cells and nuclei in microscopy images."""

__version__ = "0.1.0"

# the API is imported on first use, so that `import cellrcnn` stays light (no torch, no Lightning)
_API = ("Segmenter", "AutoSegmenter", "Result", "available_models", "model_card")


def __getattr__(name: str):
    if name in _API:
        from cellrcnn import api

        return getattr(api, name)
    raise AttributeError(f"module 'cellrcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
