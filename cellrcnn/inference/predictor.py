"""Trained models for prediction only: the network and its inference settings, rebuilt from a
checkpoint without the training stack.

Prediction starts in about the time torch takes to import: it never imports Lightning,
TensorBoard, the data modules or the evaluation code. The networks are the ones the Lightning
modules (:mod:`cellrcnn.modules`) train, and the steps after them are the same functions those
modules validate with (:func:`cellrcnn.models.unet.predict_maps`,
:func:`cellrcnn.models.postprocess.unet_outputs_to_labels`, :func:`cellrcnn.models.maskrcnn.detect`),
so training code stays the one source of the model.

A predictor returns a label image per input (``predict_labels``), never N×H×W masks: for a
1000-nucleus field those would be a gigabyte.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellrcnn.models.checkpoint import MODULE_KEY, TRAINING_IMAGES_KEY, TRAINING_PROFILE_KEY, read_checkpoint
from cellrcnn.models.precision import use_bf16


class Predictor:
    """What prediction needs from a trained model (the :class:`cellrcnn.api.Segmenter` contract).

    Args:
        net: the trained network, in eval mode.
        hparams: the checkpoint's hyper-parameters.
        checkpoint: the rest of the checkpoint (training images and profile).
        precision: ``auto`` (bfloat16 where the hardware computes it natively), ``float32`` or
            ``bfloat16``; see :mod:`cellrcnn.models.precision`.
    """

    def __init__(self, net: torch.nn.Module, hparams: dict[str, Any], checkpoint: dict[str, Any],
                 precision: str = "auto") -> None:
        self.net = net.eval()
        self.hparams = hparams
        self.training_images = list(checkpoint.get(TRAINING_IMAGES_KEY, []))
        # what it trained on, for the out-of-distribution warning (written when a model is shipped)
        self.training_profile = dict(checkpoint.get(TRAINING_PROFILE_KEY, {}))
        self.precision = precision
        use_bf16(precision)  # an unknown precision fails here, not at the first image

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def bf16(self) -> bool:
        return use_bf16(self.precision, self.device)

    @property
    def object_diameter(self) -> float | None:
        """Median diameter in pixels of the training objects; None in older checkpoints."""
        value = self.hparams.get("object_diameter")
        return float(value) if value else None

    @property
    def default_diameter(self) -> str | None:
        """The ``diameter`` mode this model is best used with (``diameter=default``), when its
        checkpoint recommends one (:mod:`cellrcnn.inference.scale`)."""
        return self.hparams.get("default_diameter") or None

    @property
    def input_settings(self) -> dict[str, Any]:
        """How images are prepared for this model (``channels``, ``invert_bright``, ``hematoxylin``),
        as :attr:`cellrcnn.modules.base.InstanceSegModule.input_settings`."""
        return {"channels": int(dict(self.hparams).get("net", {}).get("in_channels", 3)),
                "invert_bright": bool(self.hparams.get("invert_bright", False)),
                "hematoxylin": bool(self.hparams.get("hematoxylin", False))}

    def predict_labels(self, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """Per C×H×W float image: ``label_image`` int32 H×W (objects 1..N) and ``scores``
        float32 N (``scores[k]`` of label k+1)."""
        raise NotImplementedError

    def predict_instances(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The instance dicts of the Lightning modules (``masks`` N×H×W, ``boxes``, ``scores``,
        ``labels``), for code written against them; prefer :meth:`predict_labels`."""
        from cellrcnn.models.postprocess import labels_to_instances

        return [labels_to_instances(p["label_image"], p["scores"]) for p in self.predict_labels(images)]


class UNetPredictor(Predictor):
    """The U-Net: class and distance maps (flip-averaged when ``tta``), then the seeded watershed
    with the calibrated thresholds."""

    # a field up to 1536 px is predicted in one piece (1024-px tiles computed a 1040×1388 field
    # 2.9 times over: four tiles; two views of 1536² hold 1.2 GB); larger images go in 896-px
    # tiles, whose two parallel views (cellrcnn.models.unet.VIEW_THREADS) hold 0.45 GB, where
    # 1024-px tiles would hold 0.69 GB and take an 8000² field past 2 GB (4 views of 896² on two
    # cores: 1.37 s per megapixel; of 1024² one after the other, as before: 2.13 s)
    preferred_tile_size = 896
    whole_image_up_to = 1536

    def __init__(self, net, hparams, checkpoint, precision: str = "auto") -> None:
        super().__init__(net, hparams, checkpoint, precision)
        self.tta: bool | int = bool(hparams.get("tta", False))  # or a number of views (flip_count)
        self.postprocess = dict(hparams.get("postprocess") or {})

    def predict_labels(self, images: list[torch.Tensor], tta: bool | int | None = None) -> list[dict[str, np.ndarray]]:
        """As :meth:`Predictor.predict_labels`; ``tta`` overrides the predictor's flips for this call."""
        from cellrcnn.models.postprocess import unet_outputs_to_labels
        from cellrcnn.models.unet import flip_count, match_channels, predict_maps

        flips = flip_count(self.tta if tta is None else tta)
        out = []
        for image in images:
            x = match_channels(image.to(self.device, torch.float32), self.net.in_channels)
            maps = predict_maps(self.net, x, flips=flips, bf16=self.bf16)
            labels, scores = unet_outputs_to_labels(*maps, **self.postprocess)
            out.append({"label_image": labels, "scores": scores})
        return out


class MaskRCNNPredictor(Predictor):
    """Mask R-CNN: detections above the score threshold, their masks painted into one label
    image (overlaps to the higher score). ``precision`` applies to the backbone and feature
    pyramid; the detection heads run in float32 (see :func:`cellrcnn.models.maskrcnn.detect`)."""

    preferred_tile_size = 1024  # 256-channel feature pyramids: four times the U-Net's memory per pixel
    whole_image_up_to = 1024

    def __init__(self, net, hparams, checkpoint, precision: str = "auto") -> None:
        super().__init__(net, hparams, checkpoint, precision)
        self.score_threshold = float(hparams.get("score_threshold", 0.5))
        self.mask_threshold = float(hparams.get("mask_threshold", 0.5))

    @property
    def score_threshold(self) -> float:
        return float(self.net.roi_heads.score_thresh)

    @score_threshold.setter
    def score_threshold(self, value: float) -> None:
        self.net.roi_heads.score_thresh = float(value)

    @torch.inference_mode()
    def predict_labels(self, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        from cellrcnn.data.masks import object_slices
        from cellrcnn.models.maskrcnn import detect, paste_label_image

        out = []
        batch = [im.to(self.device, torch.float32) for im in images]
        for det, image in zip(detect(self.net, batch, bf16=self.bf16), images, strict=True):
            scores = det["scores"].float().cpu()
            labels = paste_label_image(det["mask_probs"], det["boxes"].float().cpu(), scores,
                                       tuple(image.shape[-2:]), self.mask_threshold)
            ids, compact, _ = object_slices(labels)  # detections whose pixels all went to others vanish
            out.append({"label_image": compact.astype(np.int32, copy=False),
                        "scores": scores.numpy()[ids - 1].astype(np.float32)})
        return out


def prediction_fn(model, quick: bool = False):
    """What predicts a list of C×H×W images with ``model`` for tiling
    (:func:`cellrcnn.inference.tiling.predict_image`): a predictor's ``predict_labels`` (label
    images) or a Lightning module's ``predict_instances``; ``quick``: one view only (a U-Net's
    test-time flips off), for the measuring pass of ``diameter=shrink``, ``auto`` and ``range``."""
    fn = getattr(model, "predict_labels", None) or model.predict_instances
    return functools.partial(fn, tta=False) if quick and hasattr(model, "tta") else fn


def set_score_threshold(model, threshold: float | None) -> None:
    """Override a module's detection score threshold (None leaves it as it is); a module without
    one (the U-Net decides by its foreground threshold) raises a ValueError."""
    if threshold is None:
        return
    if not hasattr(model, "score_threshold"):
        raise ValueError(f"{type(model).__name__} has no score threshold to override")
    model.score_threshold = float(threshold)


def _build_unet(hparams: dict[str, Any]) -> torch.nn.Module:
    from cellrcnn.models.unet import UNet

    return UNet(**dict(hparams.get("net") or {}))


def _build_maskrcnn(hparams: dict[str, Any]) -> torch.nn.Module:
    from cellrcnn.models.maskrcnn import build_maskrcnn

    # the trained weights come from the checkpoint: no backbone weights file is read
    return build_maskrcnn(**{**dict(hparams.get("net") or {}), "backbone_weights": None})


# the Lightning module a checkpoint names -> its network and predictor
PREDICTORS = {
    "UNetModule": (_build_unet, UNetPredictor),
    "MaskRCNNModule": (_build_maskrcnn, MaskRCNNPredictor),
}


def load_predictor(path: str | Path, precision: str = "auto") -> Predictor:
    """Rebuild a trained model for prediction from its checkpoint alone (the network's class and
    hyper-parameters are stored in it)."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a cellrcnn checkpoint (holds a {type(checkpoint).__name__})")
    target = checkpoint.get(MODULE_KEY)
    if target is None:
        raise ValueError(f"{path}: not a cellrcnn checkpoint (no 'cellrcnn_module' entry)")
    kind = str(target).rpartition(".")[2]
    if kind not in PREDICTORS:
        raise ValueError(f"{path}: a {kind} checkpoint; prediction knows {', '.join(PREDICTORS)}")
    build, predictor = PREDICTORS[kind]
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    net = build(hparams)
    # the module's weights are those of its ``net`` attribute
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return predictor(net, hparams, checkpoint, precision)
