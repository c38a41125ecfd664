"""The built wheel in a fresh virtual environment, used from a folder outside the checkout:
``cellrcnn predict`` and the Python API (``.ci/wheel_check``). Needs pip to reach torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_predicts_outside_the_checkout(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        proc = subprocess.run(["bash", str(REPO / ".ci" / "wheel_check"), str(tmp_path)], capture_output=True,
                              text=True, timeout=3600, env=env)
    finally:
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)  # gigabytes of torch
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "elsewhere" / "out"
    assert not str(out).startswith(str(REPO))
    summary = json.loads((out / "predictions.json").read_text())
    n = summary["images"][0]["n_objects"]
    labels = tifffile.imread(out / "img.tif")
    assert n > 0 and labels.max() == n  # objects 1..N in the label image
    assert "cellrcnn/weights/nuclei.ckpt" in summary["checkpoint"] and str(REPO) not in summary["checkpoint"]
    assert "Python API:" in proc.stdout
    assert any(p.name.endswith(".whl") for p in (tmp_path / "dist").iterdir())
