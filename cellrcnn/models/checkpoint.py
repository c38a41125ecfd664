"""What a cellrcnn checkpoint holds besides the Lightning state, and how prediction reads one."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

# the Lightning module that trained the weights (``module.path.ClassName``): rebuilds the model
MODULE_KEY = "cellrcnn_module"
# content digests of the training images (cellrcnn.data.splits.file_digest)
TRAINING_IMAGES_KEY = "cellrcnn_training_images"
# image count per modality and nucleus diameters seen in training (cellrcnn.inference.choice)
TRAINING_PROFILE_KEY = "cellrcnn_training_profile"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, unpickled with ``weights_only`` (tensors and plain containers
    only: a shipped model cannot run code on load). A training checkpoint written by an older
    Lightning may hold other objects: it is then loaded in full, with a warning, as ``train.py``
    and ``evaluate.py`` do; load only checkpoints you trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 (any unpickling error: try the full load below)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # an image, a zip, a truncated download: unpickling errors of many types
            raise ValueError(f"{path}: not a checkpoint file ({type(exc).__name__}: {str(exc)[:200]})") from exc
        warnings.warn(f"{path}: holds more than weights ({str(safe_error)[:120]}); loaded in full, "
                      "which runs code from the file: load only checkpoints you trust", stacklevel=2)
        return checkpoint
