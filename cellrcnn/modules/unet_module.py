"""UNetModule: a U-Net trained on 3-class + distance targets, predicting instances by watershed.

Training (one shared step): the instance masks of every crop are encoded on the fly by
:func:`cellrcnn.models.postprocess.targets_to_unet_maps`; the loss is class-weighted
cross-entropy (the boundary class is rare and decides whether touching nuclei split) plus a
soft Dice on the interior and boundary classes (insensitive to how much background a crop
holds) plus the mean squared error of the sigmoid distance map.
Images with box-only objects (``has_mask`` False) carry no pixel labels and are ignored.

Prediction: full images of any size (the net pads to a multiple of ``2**depth``), softmax and
sigmoid, then :func:`cellrcnn.models.postprocess.unet_outputs_to_labels`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cellrcnn.models.postprocess import (
    drop_low_scores,
    labels_to_instances,
    targets_to_unet_maps,
    unet_outputs_to_labels,
)
from cellrcnn.models.precision import use_bf16
from cellrcnn.models.unet import NUM_CLASSES, UNet, flip_count, match_channels, predict_maps
from cellrcnn.modules.base import InstanceSegModule

IGNORE = -100  # class target of padding and of images without masks

# calibration grid (cellrcnn.evaluation.calibrate); the module's current values are added to it
FG_GRID = (0.4, 0.5, 0.6, 0.7)
H_GRID = (0.02, 0.05, 0.1, 0.2)
MIN_SCORE_GRID = (0.0, 0.8, 0.85, 0.9)
BOUNDARY_GRID = (0.0, 0.5, 1.0)


def encode_batch(
    images: Sequence[torch.Tensor], targets: Sequence[dict], channels: int, boundary_width: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack images (zero-padded to the largest H, W) and encode their U-Net targets.

    Returns ``x`` B×C×H×W float, ``classes`` B×H×W int64 (``IGNORE`` on padding and on images
    with box-only objects) and ``distance`` B×H×W float in [0, 1].
    """
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    device = images[0].device
    x = torch.zeros(len(images), channels, h, w, device=device)
    classes = torch.full((len(images), h, w), IGNORE, dtype=torch.int64)
    distance = torch.zeros(len(images), h, w)
    for i, (image, target) in enumerate(zip(images, targets, strict=True)):
        ih, iw = image.shape[-2:]
        x[i, :, :ih, :iw] = match_channels(image, channels)
        if not bool(torch.as_tensor(target["has_mask"]).all()):
            continue
        cls, dist = targets_to_unet_maps(target["masks"], boundary_width)
        classes[i, :ih, :iw] = torch.from_numpy(cls)
        distance[i, :ih, :iw] = torch.from_numpy(dist)
    return x, classes.to(device), distance.to(device)


def unet_losses(
    outputs: dict[str, torch.Tensor],
    classes: torch.Tensor,
    distance: torch.Tensor,
    class_weights: Sequence[float] = (1.0, 1.0, 3.0),
    dice_weight: float = 1.0,
    distance_weight: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Weighted loss terms ``loss_class``, ``loss_dice``, ``loss_distance``; their sum is the
    training loss (every term is zero when no pixel is labelled).

    Args:
        outputs: UNet outputs, ``logits`` B×3×H×W and ``distance`` B×1×H×W (raw).
        classes: B×H×W int64 targets with ``IGNORE`` where unlabelled.
        distance: B×H×W normalised distance targets.
    """
    logits = outputs["logits"]
    valid = classes != IGNORE
    if not bool(valid.any()):
        zero = logits.sum() * 0.0  # keeps the graph so DDP sees every parameter used
        return {"loss_class": zero, "loss_dice": zero, "loss_distance": zero}
    weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    loss_class = F.cross_entropy(logits, classes, weight=weight, ignore_index=IGNORE)

    probs = logits.softmax(dim=1)
    onehot = F.one_hot(classes.clamp(min=0), NUM_CLASSES).permute(0, 3, 1, 2).to(probs.dtype)
    v = valid.unsqueeze(1).to(probs.dtype)
    inter = (probs * onehot * v).sum(dim=(0, 2, 3))[1:]
    denom = ((probs + onehot) * v).sum(dim=(0, 2, 3))[1:]
    loss_dice = 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()  # +1: an empty crop costs nothing

    pred_dist = outputs["distance"][:, 0].sigmoid()
    loss_distance = F.mse_loss(pred_dist[valid], distance[valid])
    return {
        "loss_class": loss_class,
        "loss_dice": dice_weight * loss_dice,
        "loss_distance": distance_weight * loss_distance,
    }


class UNetModule(InstanceSegModule):
    """U-Net baseline under the shared LightningModule base.

    Args:
        net: :class:`UNet` keyword arguments (``in_channels``, ``depth``, ``base_width``, ...);
            a plain mapping so the checkpoint's hyper-parameters rebuild the model.
        class_weights: cross-entropy weights of background, interior, boundary.
        dice_weight, distance_weight: weights of the Dice and distance losses.
        boundary_width: boundary band thickness of the training targets, pixels.
        postprocess: keyword arguments of :func:`unet_outputs_to_labels` (thresholds, sizes).
        tta: average the outputs over the image and its three flips at inference (4× the network
            time; the watershed runs once on the averaged maps).
        optim, log_images, iou_thresholds, coco_metrics,
            object_diameter, invert_bright, hematoxylin, default_diameter: see :class:`InstanceSegModule`.
    """

    def __init__(
        self,
        net: dict | None = None,
        class_weights: Sequence[float] = (1.0, 1.0, 3.0),
        dice_weight: float = 1.0,
        distance_weight: float = 2.0,
        boundary_width: int = 1,
        postprocess: dict | None = None,
        tta: bool = False,
        optim: dict | None = None,
        log_images: int = 4,
        iou_thresholds: Sequence[float] = (0.5, 0.7),
        coco_metrics: bool = True,
        object_diameter: float | None = None,
        invert_bright: bool = False,
        hematoxylin: bool = False,
        default_diameter: str | None = None,
    ) -> None:
        super().__init__(
            optim=optim,
            log_images=log_images,
            iou_thresholds=tuple(iou_thresholds),
            coco_metrics=coco_metrics,
        )
        # plain containers (not Hydra's DictConfig) in the checkpoint's hyper-parameters
        net, postprocess = dict(net or {}), dict(postprocess or {})
        class_weights, iou_thresholds = [float(c) for c in class_weights], [float(t) for t in iou_thresholds]
        optim = dict(optim) if optim is not None else None
        self.save_hyperparameters()
        if len(class_weights) != NUM_CLASSES:
            raise ValueError(
                f"class_weights needs {NUM_CLASSES} values (background, interior, boundary), got {class_weights}"
            )
        self.net = UNet(**net)
        self.class_weights = tuple(class_weights)
        self.dice_weight, self.distance_weight = float(dice_weight), float(distance_weight)
        self.boundary_width = int(boundary_width)
        self.postprocess = postprocess
        self.tta = bool(tta)
        self.precision = "auto"  # of inference (cellrcnn.models.precision); not a hyper-parameter

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: B×C×H×W -> UNet outputs (``logits`` B×3×H×W, ``distance`` B×1×H×W raw)."""
        return self.net(x)

    def compute_losses(
        self, images: Sequence[torch.Tensor], targets: Sequence[dict]
    ) -> dict[str, torch.Tensor]:
        """The shared step: encode targets, run the net, return the weighted loss terms (summed by the base)."""
        x, classes, distance = encode_batch(images, targets, self.net.in_channels, self.boundary_width)
        return unet_losses(
            self.net(x), classes, distance, self.class_weights, self.dice_weight, self.distance_weight
        )

    def predict_maps(self, image: torch.Tensor, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One C×H×W image -> class probabilities (3×H×W) and the distance map (H×W), numpy;
        averaged over flips when ``tta`` (default: the module's setting), in the module's
        ``precision`` (:func:`cellrcnn.models.unet.predict_maps`, which prediction runs too)."""
        was_training = self.training
        self.eval()
        try:
            x = match_channels(image.to(self.device, torch.float32), self.net.in_channels)
            flips = flip_count(self.tta if tta is None else tta)
            return predict_maps(self.net, x, flips=flips, bf16=use_bf16(self.precision, self.device))
        finally:
            self.train(was_training)

    def predict_instances(self, images: Sequence[torch.Tensor], tta: bool | int | None = None
                          ) -> list[dict[str, torch.Tensor]]:
        """list of C×H×W float images -> list of instance dicts (masks uint8 N×H×W, boxes
        float32 N×4 xyxy, scores float32 N, labels int64 N; CPU tensors), one image at a time
        because sizes differ; ``tta`` overrides the module's flips for this call."""
        results = []
        for image in images:
            labels, scores = unet_outputs_to_labels(*self.predict_maps(image, tta), **self.postprocess)
            results.append(labels_to_instances(labels, scores))
        return results

    # ---------------------------------------------------------------- calibration
    def threshold_values(self) -> dict[str, Any]:
        """The inference settings that calibration chooses, as now set."""
        pp = self.postprocess
        return {"tta": self.tta, "fg_threshold": pp.get("fg_threshold", 0.6), "h": pp.get("h", 0.05),
                "min_score": pp.get("min_score", 0.0), "boundary_weight": pp.get("boundary_weight", 0.0)}

    def threshold_grid(self) -> dict[str, list]:
        """Values tried per setting by :func:`cellrcnn.evaluation.calibrate.calibrate`: flip
        averaging, the foreground probability, the watershed seed depth ``h`` and the boundary
        weight (split versus merge), and the object score (mean foreground probability); the
        current values are always among them."""
        now = self.threshold_values()
        return {"tta": [False, True], **{name: sorted({*values, now[name]}) for name, values in (
            ("fg_threshold", FG_GRID), ("h", H_GRID), ("min_score", MIN_SCORE_GRID), ("boundary_weight", BOUNDARY_GRID))}}

    def label_images_over_grid(self, image: torch.Tensor, grid: dict[str, list]) -> Iterator[tuple[tuple, np.ndarray]]:
        """``((tta, fg_threshold, h, min_score, boundary_weight), H×W label image)`` for every grid
        point: the network runs once per ``tta`` value, the watershed once per (tta, fg, h,
        boundary weight), and the object-score filter is applied to its result."""
        maps = {flag: self.predict_maps(image, tta=flag) for flag in grid["tta"]}
        for tta, fg, h, bw in itertools.product(grid["tta"], grid["fg_threshold"], grid["h"], grid["boundary_weight"]):
            settings = {**self.postprocess, "fg_threshold": fg, "h": h, "boundary_weight": bw,
                        "seed_method": "hmaxima", "min_score": 0.0}
            labels, scores = unet_outputs_to_labels(*maps[tta], **settings)
            for score in grid["min_score"]:
                yield (tta, fg, h, score, bw), drop_low_scores(labels, scores, score)[0]

    def apply_thresholds(self, chosen: dict[str, Any]) -> dict[str, Any]:
        """Set the chosen settings (the seeds become h-maxima, which ``h`` belongs to); returns the
        hyper-parameter update that a checkpoint stores."""
        chosen = dict(chosen)
        self.tta = bool(chosen.pop("tta"))
        self.postprocess = {**self.postprocess, **chosen, "seed_method": "hmaxima"}
        return {"postprocess": self.postprocess, "tta": self.tta}

