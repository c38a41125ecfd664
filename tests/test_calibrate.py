"""Threshold calibration: known outputs in, the threshold that scores best out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellrcnn.evaluation.calibrate import calibrate, pick_images, write_calibrated
from cellrcnn.models.postprocess import targets_to_unet_maps
from cellrcnn.modules.base import load_module
from cellrcnn.modules.maskrcnn_module import MaskRCNNModule
from cellrcnn.modules.unet_module import UNetModule

TINY = {"backbone": "resnet18", "preset": "cell", "returned_layers": [1, 2, 3], "fpn_channels": 32}


def annotated_squares(*corners: tuple[int, int], size: int = 64, side: int = 12) -> tuple[torch.Tensor, dict]:
    """A blank image and its annotation: ``side``×``side`` squares at top-left corners (y, x)."""
    masks = np.zeros((len(corners), size, size), np.uint8)
    for mask, (y, x) in zip(masks, corners, strict=True):
        mask[y : y + side, x : x + side] = 1
    boxes = torch.tensor([[x, y, x + side, y + side] for y, x in corners], dtype=torch.float32)
    return torch.zeros(1, size, size), {"masks": torch.from_numpy(masks), "boxes": boxes}


def squares() -> tuple[torch.Tensor, dict]:
    """Two annotated 12×12 squares apart."""
    return annotated_squares((10, 10), (40, 30))


class FixedDetections(MaskRCNNModule):
    """The two squares found with score 0.9 plus a false positive scoring 0.35."""

    def detect(self, images):
        boxes = torch.tensor([[10.0, 10, 22, 22], [30, 40, 42, 52], [50, 5, 60, 15]])
        scores = torch.tensor([0.9, 0.9, 0.35])
        keep = scores >= self.score_threshold
        probs = torch.ones(3, 1, 28, 28)
        return [{"boxes": boxes[keep], "scores": scores[keep], "labels": torch.ones(int(keep.sum()), dtype=torch.int64),
                 "mask_probs": probs[keep]}]  # fmt: skip


def test_maskrcnn_calibration_drops_the_false_positive():
    module = FixedDetections(net=TINY, score_threshold=0.3)
    update, report = calibrate(module, [squares()])
    assert update["score_threshold"] == 0.4  # the lowest threshold above the false positive
    assert module.score_threshold == 0.4 and module.net.roi_heads.score_thresh == 0.4
    assert report["dsb_score"] > report["previous_dsb_score"]
    assert report["previous"]["score_threshold"] == 0.3
    pred = module.predict_instances([squares()[0]])[0]
    assert len(pred["scores"]) == 2


class GroundTruthMaps(UNetModule):
    """U-Net outputs made from the annotation: class probability 0.85 for interior and boundary."""

    def predict_maps(self, image, tta=None):
        _, target = squares()
        classes, distance = targets_to_unet_maps(target["masks"].numpy())
        probs = np.zeros((3, *classes.shape), np.float32)
        probs[1][classes == 1] = 0.85
        probs[2][classes == 2] = 0.85
        probs[0] = 1.0 - probs[1] - probs[2]
        return probs, distance.astype(np.float32)


def test_unet_calibration_lowers_a_foreground_threshold_that_loses_objects():
    module = GroundTruthMaps(net={"in_channels": 1, "base_width": 8, "depth": 2}, postprocess={"fg_threshold": 0.9})
    update, report = calibrate(module, [squares()])
    assert report["previous_dsb_score"] == 0.0  # 0.85 foreground probability never passes 0.9
    assert update["postprocess"]["fg_threshold"] <= 0.6
    assert report["dsb_score"] == 1.0
    assert module.postprocess["fg_threshold"] == update["postprocess"]["fg_threshold"]
    assert update["tta"] is False  # identical maps either way: the first grid point (no flips) wins ties


class MapsWithDebris(GroundTruthMaps):
    """The same maps plus an unannotated 10×10 blob of foreground probability 0.75 (debris)."""

    def predict_maps(self, image, tta=None):
        probs, distance = super().predict_maps(image, tta)
        probs[:, 5:15, 45:55] = np.array([0.25, 0.75, 0.0], np.float32)[:, None, None]
        yy, xx = np.mgrid[5:15, 45:55]
        distance[5:15, 45:55] = 1.0 - np.maximum(np.abs(yy - 9.5), np.abs(xx - 49.5)) / 5.0
        return probs, distance


def test_unet_calibration_chooses_an_object_score_that_drops_debris():
    module = MapsWithDebris(net={"in_channels": 1, "base_width": 8, "depth": 2}, postprocess={"fg_threshold": 0.6})
    update, report = calibrate(module, [squares()])
    assert report["previous"]["min_score"] == 0.0 and report["previous_dsb_score"] < 1.0
    assert update["postprocess"]["min_score"] == 0.8  # the lowest grid score above the debris's 0.75
    assert report["dsb_score"] == 1.0
    pred = module.predict_instances([squares()[0]])[0]
    assert len(pred["scores"]) == 2 and float(pred["scores"].min()) >= 0.8


def touching_squares() -> tuple[torch.Tensor, dict]:
    """Two annotated 12×12 squares side by side, sharing an edge."""
    return annotated_squares((20, 10), (20, 22))


class OneDomeOverTwo(UNetModule):
    """Exact class maps of the touching squares, but one distance dome over both (a blurry
    distance head): only the boundary class tells them apart."""

    def predict_maps(self, image, tta=None):
        _, target = touching_squares()
        classes, _ = targets_to_unet_maps(target["masks"].numpy())
        probs = np.stack([classes == k for k in range(3)]).astype(np.float32)
        yy, xx = np.mgrid[: classes.shape[0], : classes.shape[1]]
        dome = np.clip(1 - ((xx - 21.5) / 14.0) ** 2 - ((yy - 25.5) / 8.0) ** 2, 0, 1) * (classes > 0)
        return probs, dome.astype(np.float32)


def test_unet_calibration_weighs_the_boundary_to_split_touching_objects():
    module = OneDomeOverTwo(net={"in_channels": 1, "base_width": 8, "depth": 2}, postprocess={"fg_threshold": 0.5})
    update, report = calibrate(module, [touching_squares()])
    assert report["previous"]["boundary_weight"] == 0.0
    assert report["previous_dsb_score"] < 0.1  # one merged object, IoU 0.5 with either square
    assert update["postprocess"]["boundary_weight"] == 0.5  # the lowest grid weight that splits them
    assert report["dsb_score"] > 0.5
    assert len(module.predict_instances([touching_squares()[0]])[0]["scores"]) == 2


def test_calibrated_checkpoint_round_trip(tmp_path):
    module = MaskRCNNModule(net=TINY, score_threshold=0.5, mask_threshold=0.5)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"cellrcnn_module": "cellrcnn.modules.maskrcnn_module.MaskRCNNModule",
                "hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)  # fmt: skip
    out = write_calibrated(ckpt, {"score_threshold": 0.7, "mask_threshold": 0.4}, {"chosen": "x"}, tmp_path / "c.ckpt")
    loaded = load_module(out)
    assert (loaded.score_threshold, loaded.mask_threshold, loaded.net.roi_heads.score_thresh) == (0.7, 0.4, 0.7)
    assert torch.load(out, weights_only=False)["cellrcnn_calibration"] == {"chosen": "x"}


def test_calibrate_rejects_other_modules():
    with pytest.raises(TypeError, match="no thresholds"):
        calibrate(torch.nn.Linear(2, 2), [])


def test_pick_images_spreads_and_caps():
    assert pick_images(10, None) == list(range(10))
    assert pick_images(10, 3) == [0, 4, 9]
    assert pick_images(3, 48) == [0, 1, 2]


def test_calibration_stops_at_its_deadline_after_the_minimum():
    import time

    from cellrcnn.evaluation.calibrate import MIN_IMAGES

    module = FixedDetections(net=TINY, score_threshold=0.3)
    seen = []

    def samples():
        for _ in range(MIN_IMAGES + 3):
            seen.append(1)
            yield squares()

    _, report = calibrate(module, samples(), deadline=time.monotonic() - 1.0)  # already spent
    assert report["n_images"] == MIN_IMAGES and len(seen) == MIN_IMAGES + 1  # one read, then stopped
    _, report = calibrate(module, samples(), deadline=time.monotonic() + 3600)
    assert report["n_images"] == MIN_IMAGES + 3


class MapsOfTheImage(UNetModule):
    """Exact maps of the bright squares of whatever image it is given, which it records: what the
    watershed gets depends only on the size the image reaches the network at."""

    def predict_maps(self, image, tta=None):
        from scipy import ndimage

        self.seen.append(tuple(image.shape[-2:]))
        labels, n = ndimage.label(image[0].numpy() > 0.5)
        classes, distance = targets_to_unet_maps(np.stack([labels == k for k in range(1, n + 1)]).astype(np.uint8))
        probs = np.stack([classes == k for k in range(3)]).astype(np.float32)
        return probs, distance.astype(np.float32)


def big_squares() -> tuple[torch.Tensor, dict]:
    """Nine annotated 36×36 squares (40.6 px equivalent diameter), bright on a 128² image."""
    corners = [(y, x) for y in (2, 45, 88) for x in (2, 45, 88)]
    image, target = annotated_squares(*corners, size=128, side=36)
    return target["masks"].amax(0, keepdim=True).float(), target


@pytest.mark.parametrize("mode, object_diameter, side", [
    ("auto", 15.0, 47),     # brought to the model's 15 px: 15 / 40.6 of 128
    (None, 14.0, 88),       # shrink (the default mode): beyond 2.8x the model's 14 px, brought to 2x it
    ("shrink", 15.0, 128),  # 40.6 px is within 2.8x of 15 px: native size
    ("range", 14.0, 88),    # range shrinks as shrink does
    ("range", 40.0, 128),   # and enlarges only objects more than 30 % below the median: native size
    ("range", 60.0, 189),   # 40.6 px against 60: enlarged 1.48x, as auto would
    ("auto", None, 128),    # a model without a training size: native size
])
def test_calibration_sees_each_image_at_the_size_prediction_gives_it(mode, object_diameter, side):
    module = MapsOfTheImage(net={"in_channels": 1, "base_width": 8, "depth": 2}, postprocess={"fg_threshold": 0.5},
                            object_diameter=object_diameter, default_diameter=mode)
    module.seen = []
    _, report = calibrate(module, [big_squares()])
    assert set(module.seen) == {(side, side)}
    assert report["resized_images"] == (side != 128)
    assert report["dsb_score"] > 0.8  # the annotation was resized with the image
