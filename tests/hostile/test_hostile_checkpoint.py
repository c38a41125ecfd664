"""A path that is not a checkpoint (an image, an empty file, a truncated download) is a clear
error naming the file, not a raw unpickling traceback."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellrcnn.modules.base import load_module


@pytest.mark.parametrize("content", ["tiff", b"", b"PK\x03\x04 truncated zip"])
def test_not_a_checkpoint_names_the_file(tmp_path, content):
    path = tmp_path / "model.ckpt"
    if content == "tiff":
        tifffile.imwrite(path, np.zeros((4, 4), np.uint8))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model.ckpt: not a checkpoint file"):
        load_module(path)
