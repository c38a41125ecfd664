"""Mask R-CNN as a LightningModule: losses, instance prediction, box-only targets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..models.maskrcnn import build_maskrcnn, detect, paste_label_image, paste_masks
from ..models.precision import use_bf16
from .base import InstanceSegModule

# calibration grid (cellrcnn.evaluation.calibrate); the module's current values are added to it
SCORE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MASK_GRID = (0.4, 0.5, 0.6, 0.7)


class MaskRCNNModule(InstanceSegModule):
    """Trains and runs :func:`cellrcnn.models.maskrcnn.build_maskrcnn`.

    Args:
        net: keyword arguments of ``build_maskrcnn`` (backbone, preset, anchor sizes, RPN/RoI
            sampling...); stored in the checkpoint so ``load_module(ckpt)`` rebuilds the model.
        optim: optimiser/schedule settings (see ``cellrcnn.modules.base.OPTIM_DEFAULTS``).
        score_threshold: detections scoring below this are dropped by ``predict_instances``.
        mask_threshold: mask probabilities above this are foreground.
        log_images, iou_thresholds, coco_metrics,
            object_diameter, invert_bright, hematoxylin, default_diameter: see :class:`InstanceSegModule`.

    Box-only annotations (``has_mask`` False, e.g. BBBC041) train the RPN and box head but never
    the mask head: torchvision's mask loss has no per-object switch, so an image whose objects are
    not all masked is run through the model with the mask branch disabled (a second forward pass
    when a batch mixes both kinds). Such images would otherwise teach the mask head empty masks.
    """

    def __init__(
        self,
        net: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        log_images: int = 4,
        iou_thresholds: tuple[float, ...] = (0.5, 0.7),
        coco_metrics: bool = True,
        object_diameter: float | None = None,
        invert_bright: bool = False,
        hematoxylin: bool = False,
        default_diameter: str | None = None,
    ) -> None:
        super().__init__(optim=optim, log_images=log_images, iou_thresholds=iou_thresholds, coco_metrics=coco_metrics)
        self.save_hyperparameters()
        self.net = build_maskrcnn(**(net or {}))
        self.in_channels = int((net or {}).get("in_channels", 3))
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.precision = "auto"  # of inference (cellrcnn.models.precision); not a hyper-parameter

    @property
    def score_threshold(self) -> float:
        """Detections scoring above this are kept. It lives in the RoI heads, so the mask head and
        mask pasting run only on kept detections (COCO AP is computed from these too)."""
        return float(self.net.roi_heads.score_thresh)

    @score_threshold.setter
    def score_threshold(self, value: float) -> None:
        self.net.roi_heads.score_thresh = float(value)

    # ---------------------------------------------------------------- training
    def _run(self, images: list[torch.Tensor], targets: list[dict], with_masks: bool) -> dict[str, torch.Tensor]:
        heads = self.net.roi_heads
        if with_masks:
            return self.net(images, targets)
        saved = heads.mask_roi_pool
        heads.mask_roi_pool = None  # RoIHeads.has_mask() is False: no mask loss, masks not required
        try:
            losses = self.net(images, [{k: t[k] for k in ("boxes", "labels")} for t in targets])
        finally:
            heads.mask_roi_pool = saved
        # zero-valued term touching the mask branch: DDP then sees a gradient for every parameter
        unused = sum(p.sum() for p in (*heads.mask_head.parameters(), *heads.mask_predictor.parameters()))
        losses["loss_mask"] = unused * 0.0
        return losses

    def compute_losses(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Mask R-CNN losses (``loss_classifier``, ``loss_box_reg``, ``loss_mask``,
        ``loss_objectness``, ``loss_rpn_box_reg``) averaged over the batch's images."""
        clean = [self._clean(t) for t in targets]
        masked = [bool(t["has_mask"].all()) for t in clean]
        groups = [(flag, [i for i, m in enumerate(masked) if m == flag]) for flag in (True, False)]
        total: dict[str, torch.Tensor] = {}
        for with_masks, idx in groups:
            if not idx:
                continue
            losses = self._run([images[i] for i in idx], [clean[i] for i in idx], with_masks)
            weight = len(idx) / len(images)
            for k, v in losses.items():
                total[k] = total.get(k, 0.0) + weight * v
        return total

    @staticmethod
    def _clean(target: dict) -> dict:
        """Drop degenerate boxes (zero width or height), which torchvision rejects."""
        boxes = target["boxes"].float()
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {
            "boxes": boxes[keep],
            "labels": target["labels"][keep],
            "masks": target["masks"][keep],
            "has_mask": target["has_mask"][keep],
        }

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict]:
        """Detections of :func:`cellrcnn.models.maskrcnn.detect` scoring above ``score_threshold``
        (``boxes``, ``scores``, ``labels``, unpasted ``mask_probs``), in decreasing score order; the
        backbone in bfloat16 where ``precision`` (``auto``: where the hardware computes it) says so."""
        was_training = self.net.training
        self.net.eval()
        try:
            return detect(self.net, [im.to(self.device, torch.float32) for im in images],
                          bf16=use_bf16(self.precision, self.device))
        finally:
            self.net.train(was_training)

    def paste(self, detections: dict, size: tuple[int, int], mask_threshold: float | None = None) -> dict:
        """One image's detections as an instance dict: ``masks`` uint8 N×H×W (probabilities above
        ``mask_threshold``, default the module's), ``boxes`` float32 N×4, ``scores``, ``labels`` (CPU)."""
        threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        boxes = detections["boxes"].float().cpu()
        if detections["mask_probs"] is None:  # a box-only head
            masks = torch.zeros((len(boxes), *size), dtype=torch.uint8)
        else:
            masks = paste_masks(detections["mask_probs"].float().cpu(), boxes, size, threshold)
        return {
            "masks": masks,
            "boxes": boxes,
            "scores": detections["scores"].float().cpu(),
            "labels": detections["labels"].long().cpu(),
        }

    @torch.no_grad()
    def predict_instances(self, images: list[torch.Tensor]) -> list[dict]:
        """Per image: ``masks`` uint8 N×H×W, ``boxes`` float32 N×4, ``scores`` N, ``labels`` N (CPU),
        detections scoring above ``score_threshold`` in decreasing score order."""
        return [self.paste(det, tuple(im.shape[-2:])) for det, im in zip(self.detect(images), images, strict=True)]

    # ---------------------------------------------------------------- calibration
    def threshold_values(self) -> dict[str, float]:
        """The decision thresholds that calibration chooses, as now set."""
        return {"score_threshold": self.score_threshold, "mask_threshold": self.mask_threshold}

    def threshold_grid(self) -> dict[str, list[float]]:
        """Values tried per threshold by :func:`cellrcnn.evaluation.calibrate.calibrate`: the detection
        score (false positives cost as much as misses in the DSB score) and the mask probability
        (how far a mask reaches); the current values are always among them."""
        return {"score_threshold": sorted({*SCORE_GRID, self.score_threshold}),
                "mask_threshold": sorted({*MASK_GRID, self.mask_threshold})}

    def label_images_over_grid(
        self, image: torch.Tensor, grid: dict[str, list[float]]
    ) -> Iterator[tuple[tuple[float, float], np.ndarray]]:
        """``((score_threshold, mask_threshold), H×W label image)`` for every grid point, from one
        network pass at the lowest score threshold: each pixel holds its best detection, and a
        higher score threshold masks out the weaker ones."""
        saved = self.score_threshold
        self.score_threshold = min(grid["score_threshold"])
        try:
            det = self.detect([image])[0]
        finally:
            self.score_threshold = saved
        det_scores = det["scores"].float().cpu()
        labels_by_mask = {
            mask_t: paste_label_image(det["mask_probs"], det["boxes"], det_scores, tuple(image.shape[-2:]), mask_t)
            for mask_t in grid["mask_threshold"]
        }
        for score_t in grid["score_threshold"]:
            kept = np.concatenate([[False], det_scores.numpy() >= score_t])
            for mask_t, labels in labels_by_mask.items():
                yield (score_t, mask_t), labels * kept[labels]

    def apply_thresholds(self, chosen: dict[str, float]) -> dict[str, Any]:
        """Set the chosen thresholds; returns the hyper-parameter update that a checkpoint stores."""
        self.score_threshold = float(chosen["score_threshold"])
        self.mask_threshold = float(chosen["mask_threshold"])
        return {"score_threshold": self.score_threshold, "mask_threshold": self.mask_threshold}

