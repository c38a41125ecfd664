"""Prediction without the training stack: predictors rebuilt from checkpoints give the Lightning
modules' own results, and loading one neither imports Lightning nor unpickles code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cellrcnn.data.masks import masks_to_label_image
from cellrcnn.inference.predictor import MaskRCNNPredictor, UNetPredictor, load_predictor
from cellrcnn.models.checkpoint import MODULE_KEY, TRAINING_PROFILE_KEY
from cellrcnn.modules import MaskRCNNModule, UNetModule


def save_checkpoint(module, path, **extra):
    """What train.py's checkpoints hold for prediction (Lightning's own entries aside)."""
    cls = type(module)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                MODULE_KEY: f"{cls.__module__}.{cls.__qualname__}", **extra}, path)
    return path


def disks(h=64, w=80):
    yy, xx = np.mgrid[:h, :w]
    image = np.zeros((h, w), np.float32)
    for cy, cx, r in ((16, 20, 7), (40, 50, 9), (20, 60, 6)):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.9
    return torch.from_numpy(image)[None]


def test_unet_predictor_gives_the_modules_label_image(tmp_path):
    torch.manual_seed(0)
    module = UNetModule(net={"in_channels": 1, "base_width": 8, "depth": 2}, tta=True,
                        postprocess={"fg_threshold": 0.3, "min_size": 3}, object_diameter=14.0).eval()
    module.precision = "float32"
    path = save_checkpoint(module, tmp_path / "unet.ckpt", **{TRAINING_PROFILE_KEY: {"modalities": {"fluorescence": 3}}})
    predictor = load_predictor(path, precision="float32")
    assert isinstance(predictor, UNetPredictor) and predictor.tta and predictor.object_diameter == 14.0
    assert predictor.input_settings == module.input_settings
    assert predictor.training_profile == {"modalities": {"fluorescence": 3}}
    image = disks()
    (got,) = predictor.predict_labels([image])
    expected = module.predict_instances([image])[0]
    np.testing.assert_array_equal(got["label_image"], masks_to_label_image(expected["masks"].numpy()))
    np.testing.assert_allclose(got["scores"], expected["scores"].numpy(), rtol=1e-6)


def test_maskrcnn_predictor_gives_the_modules_detections(tmp_path):
    from tests.test_maskrcnn import TINY

    torch.manual_seed(0)
    module = MaskRCNNModule(net=TINY, score_threshold=0.0).eval()
    path = save_checkpoint(module, tmp_path / "maskrcnn.ckpt")
    predictor = load_predictor(path)
    assert isinstance(predictor, MaskRCNNPredictor) and predictor.score_threshold == 0.0
    image = disks().expand(3, -1, -1) if TINY.get("in_channels", 3) == 3 else disks()
    (got,) = predictor.predict_labels([image])
    expected = module.predict_instances([image])[0]
    painted = masks_to_label_image(expected["masks"].numpy(), expected["scores"].numpy())
    # the same pixels in the same objects; label numbers compacted where a detection lost all its pixels
    assert len(got["scores"]) == len(np.unique(painted)) - 1 > 0
    assert np.array_equal(got["label_image"] > 0, painted > 0)
    for k in np.unique(painted)[1:]:
        assert len(np.unique(got["label_image"][painted == k])) == 1


def test_loading_a_shipped_model_imports_no_training_stack():
    code = ("import sys; from cellrcnn.api import Segmenter; s = Segmenter.from_pretrained('nuclei'); "
            "import numpy as np; s.segment(np.zeros((64, 64), np.uint8)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pandas', 'tensorboard')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_checkpoint_that_runs_code_on_load_is_refused_by_the_safe_load(tmp_path):
    """Weights-only unpickling refuses arbitrary objects; the full load then happens only with a warning."""

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, MODULE_KEY: "x.UNetModule", "extra": Payload()}, path)
    with pytest.warns(UserWarning, match="loaded in full"), pytest.raises(RuntimeError, match="state_dict"):
        load_predictor(path)


def test_unet_predicts_fields_up_to_1536_px_in_one_piece_and_larger_ones_in_tiles():
    from cellrcnn.api import Segmenter

    segmenter = Segmenter.from_pretrained("nuclei", tta=False)
    seen = []
    predict = segmenter.module.predict_labels
    segmenter.module.predict_labels = lambda images, **kw: seen.extend(tuple(im.shape[-2:]) for im in images) or predict(images, **kw)
    segmenter.segment(np.zeros((1040, 1388), np.uint8), diameter=None)
    assert seen == [(1040, 1388)]  # 1024-px tiles would have computed four tiles
    seen.clear()
    segmenter.segment(np.zeros((1600, 700), np.uint8), diameter=None)
    # a quick look at the centre (for the tile overlap), then two tiles
    assert seen[0] == (1024, 700) and len(seen) == 3 and max(max(s) for s in seen[1:]) <= 896
    assert Segmenter.from_pretrained("nuclei", tile_size=512).whole_image_up_to == 512  # the user's tiles win
