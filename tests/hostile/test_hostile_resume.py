"""Kill -9 in the middle of training, resume from ``last.ckpt``: the weights must equal those of an
uninterrupted run (the data order, augmentations and sampling RNGs continue, not restart), and the
wall-time budget continues from where it stopped."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.synthetic.n_train=4", "data.synthetic.n_val=1", "data.synthetic.n_test=1", "data.synthetic.size=64",
    "data.crop_size=48", "data.batch_size=2", "model.net.fpn_channels=16", "model.net.returned_layers=[1,2,3]",
    "model.net.rpn_post_nms_top_n_train=50", "model.net.box_batch_size_per_image=16",
    "model.net.rpn_post_nms_top_n_test=20", "model.net.box_detections_per_img=20", "model.coco_metrics=false",
    "logger=none", "threads=1", "test=false", "trainer.max_time=00:01:00:00", "trainer.num_sanity_val_steps=0",
]

# runs train.run in a fresh process, as `python train.py` would; KILL_AT_STEP sends SIGKILL to itself
# at the start of that optimiser step (after the checkpoint of the previous epoch was written)
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import lightning as L
    import cellrcnn.train as train_module
    from cellrcnn.train import compose_config, run

    out, kill_at, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

    class Kill(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_start(self, trainer, *args):
            timer = next(c for c in trainer.callbacks if type(c).__name__ == "Timer")
            print("TIMER_OFFSET", timer._offset, flush=True)

    original = train_module.build_callbacks
    train_module.build_callbacks = lambda cfg, with_logger: [*original(cfg, with_logger), Kill()]
    run(compose_config("train", overrides, out))
""")


def _train(tmp_path: Path, out: Path, kill_at: int, *extra: str) -> subprocess.CompletedProcess:
    args = [f"data.root={tmp_path / 'data'}", *TINY, *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(kill_at), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    # 4 training images, batch 2: 2 steps per epoch; 3 epochs
    whole = _train(tmp_path, tmp_path / "whole", -1, "trainer.max_steps=6")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = _train(tmp_path, tmp_path / "killed", 5, "trainer.max_steps=6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    # written at an epoch end before the kill (ModelCheckpoint refreshes it with each new best)
    assert torch.load(last, weights_only=False)["global_step"] in (2, 4)

    resumed = _train(tmp_path, tmp_path / "resumed", -1, "trainer.max_steps=6", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the wall-time budget continued: the Timer started from the first leg's elapsed time
    offset = float(resumed.stdout.split("TIMER_OFFSET")[1].split()[0])
    assert offset > 0.0

    a, b = _weights(tmp_path / "whole" / "checkpoints" / "last.ckpt"), _weights(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
