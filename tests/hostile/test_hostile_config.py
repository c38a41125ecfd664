"""Mistyped config values are refused when a command starts, naming the key: no late crash in a
data loader or a tiler after minutes of work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellrcnn.config import compose_config
from cellrcnn.config_types import check_types
from cellrcnn.errors import UsageError


@pytest.mark.parametrize("command,override,message", [
    ("train", "data.batch_size=abc", "data.batch_size='abc': expected a positive integer"),
    ("train", "data.crop_size=0", "data.crop_size=0: expected null or a positive integer"),
    ("train", "model.optim.lr=fast", "model.optim.lr='fast': expected a positive number"),
    ("train", "trainer.max_steps=1.5", "trainer.max_steps=1.5: expected an integer"),
    ("predict", "tile_size=abc", "tile_size='abc': expected null or a positive integer"),
    ("predict", "channel=-1", "channel=-1: expected null or an integer >= 0"),
    ("evaluate", "score_threshold=2", "score_threshold=2: expected null or a number from 0 to 1"),
])
def test_mistyped_value_names_the_key(command, override, message):
    extra = ["data=synthetic"] if command == "evaluate" else []
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_types(compose_config(command, [*extra, override]))


def test_every_shipped_experiment_passes():
    from cellrcnn.config import CONF_DIR

    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        check_types(compose_config("train", [f"experiment={path.stem}"]))


def test_predict_command_refuses_a_mistyped_tile_size_before_writing(tmp_path: Path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    proc = subprocess.run([sys.executable, "-m", "cellrcnn.cli", "predict", f"input={tmp_path / 'a.png'}",
                           f"output={tmp_path / 'out'}", "tile_size=abc"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "tile_size='abc'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
