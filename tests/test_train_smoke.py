"""Training end to end on a tiny synthetic set: fast_dev_run, checkpoint resume, DDP on CPU (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from cellrcnn.modules.base import load_module
from cellrcnn.train import compose_config, run

REPO = Path(__file__).resolve().parents[1]
# a few 96 px images and a narrow model: seconds per step on one CPU core
TINY = [
    "data.synthetic.n_train=4", "data.synthetic.n_val=2", "data.synthetic.n_test=2", "data.synthetic.size=96",
    "data.crop_size=96", "data.batch_size=2", "model.net.fpn_channels=32", "model.net.returned_layers=[1,2,3]",
    "model.net.rpn_post_nms_top_n_train=200", "model.net.box_batch_size_per_image=32",
    "model.net.rpn_post_nms_top_n_test=100", "model.net.box_detections_per_img=100", "model.coco_metrics=false",
    "logger=none", "threads=1",
]


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"data.root={tmp_path.parent / 'tiny_synthetic'}", *TINY, *extra]


def test_fast_dev_run(tmp_path):
    cfg = compose_config("train", tiny_overrides(tmp_path, "trainer=debug"), tmp_path)
    assert run(cfg) == {}  # one training and one validation batch, then no test


class CountBatches(L.Callback):
    def __init__(self):
        self.batches, self.first_step = 0, None

    def on_train_batch_start(self, trainer, *args):
        self.first_step = trainer.global_step if self.first_step is None else self.first_step
        self.batches += 1


def test_resume_continues_global_step(tmp_path, monkeypatch):
    first = compose_config("train", tiny_overrides(tmp_path, "trainer.max_steps=2", "test=false"), tmp_path / "a")
    run(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.is_file()

    counter = CountBatches()
    import cellrcnn.train as train_module

    original = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks", lambda cfg, with_logger: [*original(cfg, with_logger), counter])
    second = compose_config(
        "train", tiny_overrides(tmp_path, "trainer.max_steps=3", "test=false", f"ckpt_path={last}"), tmp_path / "b"
    )
    run(second)
    assert (counter.first_step, counter.batches) == (2, 1)  # continued at step 2, ran only step 3


def test_final_weights_saved_without_a_new_best(tmp_path):
    """last.ckpt holds the weights at the end of training, step 3, although the last validation
    (and so ModelCheckpoint's last save) was at step 2: a wall-time-budget run is scored on these."""
    cfg = compose_config(
        "train", tiny_overrides(tmp_path, "trainer.max_steps=3", "test=false"), tmp_path
    )
    run(cfg)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_train_then_test_writes_metrics(tmp_path, capsys):
    cfg = compose_config("train", tiny_overrides(tmp_path, "trainer.max_steps=2", "test_weights=final"), tmp_path)
    metrics = run(cfg)
    # the test table says how to score the weights as predict.py predicts
    hint = f"python evaluate.py ckpt_path={tmp_path / 'checkpoints' / 'calibrated.ckpt'} data=synthetic split=test"
    assert hint in capsys.readouterr().out
    assert 0.0 <= metrics["test/dsb_score"] <= 1.0
    assert metrics["test/n_images"] == 2
    assert (tmp_path / "metrics.md").read_text().startswith("**default: test split")
    assert (tmp_path / "test_overlay_tp_fp_fn.png").is_file()
    # thresholds chosen on the validation images and stored with the weights
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert set(report["chosen"]) == {"score_threshold", "mask_threshold"}
    assert report["dsb_score"] >= report["previous_dsb_score"]
    calibrated = load_module(tmp_path / "checkpoints" / "calibrated.ckpt")
    assert calibrated.score_threshold == report["chosen"]["score_threshold"]
    assert calibrated.mask_threshold == report["chosen"]["mask_threshold"]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """Two gloo processes, two steps each, through the real train.py entry point."""
    cmd = [sys.executable, "train.py", "trainer=ddp", "trainer.max_steps=2", "trainer.limit_val_batches=1",
           "test=false", f"hydra.run.dir={tmp_path}", *tiny_overrides(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size: 2" in proc.stderr + proc.stdout or "distributed_backend=gloo" in proc.stderr + proc.stdout
    # every parameter's layout matches its gradient's, so DDP's buckets need no copy (nor warn)
    assert "Grad strides do not match bucket view strides" not in proc.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
