"""What every instance-segmentation LightningModule shares: one training step, the optimiser and
learning-rate schedule, validation/test through the :class:`~cellrcnn.evaluation.Evaluator`, and
TensorBoard overlays.

A subclass implements two methods and calls ``self.save_hyperparameters()`` in its ``__init__``
(so a checkpoint alone rebuilds the model, see :func:`load_module`):

- ``compute_losses(images, targets) -> dict[str, Tensor]``: scalar training losses by name;
  their sum is optimised.
- ``predict_instances(images) -> list[dict]``: per image ``masks`` uint8 N×H×W, ``boxes``
  float32 N×4 xyxy, ``scores`` float32 N, ``labels`` int64 N (CPU tensors).

Logged keys: ``train/<loss name>``, ``train/loss``, ``val/<metric>`` and ``test/<metric>`` with the
Evaluator's metric names (``val/dsb_score``, ``val/segm_AP``, ...).
"""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer

from ..evaluation.evaluator import Evaluator
from ..models.checkpoint import MODULE_KEY, TRAINING_IMAGES_KEY, TRAINING_PROFILE_KEY

# Under DDP Lightning asks for sync_dist on epoch-level logs (when it reduces them, after
# ``self.log``); the evaluator's metrics are already gathered and identical on every rank.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")

OPTIM_DEFAULTS: dict[str, Any] = {
    "name": "adamw",  # adamw | sgd
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "momentum": 0.9,  # sgd only
    "schedule": "cosine",  # cosine | step | constant (after the warm-up)
    "warmup_steps": 100,
    "warmup_start_factor": 0.01,
    "min_lr_ratio": 0.02,  # cosine floor, as a fraction of lr
    "milestones": (0.7, 0.9),  # step schedule: fractions of the run
    "gamma": 0.1,  # step schedule: factor at each milestone
    "total_steps": None,  # schedule length when the trainer has no step/epoch limit (max_time only)
}


# the per-source metrics logged beside the pooled ones (``val/<source>/<metric>``)
SOURCE_METRICS = ("dsb_score", "f1@0.5", "precision@0.5", "recall@0.5", "pq@0.5", "segm_AP", "dice")


def lr_factor(step: int, total: float, cfg: dict[str, Any], time_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` of ``total``.

    Linear warm-up from ``warmup_start_factor`` to 1 over ``warmup_steps``, then cosine down to
    ``min_lr_ratio``, step decay by ``gamma`` at ``milestones`` (fractions of the run), or constant.
    ``time_fraction`` is the share of a wall-time budget already used: the schedule follows
    whichever of steps and time is further along, so a run stopped by ``max_time`` still ends
    annealed.
    """
    warm = int(cfg["warmup_steps"])
    if step < warm:
        start = float(cfg["warmup_start_factor"])
        return start + (1.0 - start) * step / warm
    if cfg["schedule"] == "constant":
        return 1.0
    if cfg["schedule"] == "step":
        passed = sum(step >= m * total or time_fraction >= m for m in cfg["milestones"])
        return float(cfg["gamma"]) ** passed
    if cfg["schedule"] == "cosine":
        progress = min(1.0, max((step - warm) / max(1, total - warm), time_fraction))
        floor = float(cfg["min_lr_ratio"])
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule must be cosine, step or constant, got {cfg['schedule']!r}")


class InstanceSegModule(L.LightningModule):
    """Base LightningModule; see the module docstring for the subclass contract.

    Args:
        optim: optimiser and schedule settings, keys of :data:`OPTIM_DEFAULTS` (missing keys
            take the defaults).
        log_images: validation images drawn into the TensorBoard overlay grid each epoch.
        iou_thresholds: Evaluator matching thresholds.
        coco_metrics: compute COCO AP during validation (pycocotools; slower on big sets).
        object_diameter (a subclass argument, stored with its hyper-parameters): median diameter
            of the training objects in pixels; set from the training annotations when fitting starts.
        invert_bright (a subclass argument, stored with its hyper-parameters): whether the model
            was trained on images whose bright backgrounds were inverted (the data module's
            ``invert_bright``, recorded when fitting starts); inference prepares images the same way.
        hematoxylin (likewise): whether colour-stained tissue was fed as its hematoxylin density.
        default_diameter (likewise): the ``diameter`` mode ``predict.py diameter=default`` uses
            with this model (``shrink``, ``range`` or ``auto``; None: shrink), set when a model is shipped.
    """

    def __init__(
        self,
        optim: dict[str, Any] | None = None,
        log_images: int = 4,
        iou_thresholds: tuple[float, ...] = (0.5, 0.7),
        coco_metrics: bool = True,
    ) -> None:
        super().__init__()
        unknown = set(optim or {}) - set(OPTIM_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown optim settings {sorted(unknown)}; known: {sorted(OPTIM_DEFAULTS)}")
        self.optim = {**OPTIM_DEFAULTS, **(optim or {})}
        self.log_images = log_images
        self.evaluator = Evaluator(iou_thresholds=tuple(iou_thresholds), coco=coco_metrics)
        self._shown: list[tuple[torch.Tensor, dict, dict]] = []
        self.last_metrics: dict[str, float] = {}
        self.last_overlay = None
        self.training_images: list[str] = []  # content digests, recorded when fitting starts

    # ---------------------------------------------------------------- subclass contract
    def compute_losses(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict_instances(self, images: list[torch.Tensor]) -> list[dict]:
        raise NotImplementedError

    # ---------------------------------------------------------------- training
    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.compute_losses(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} ({parts}); "
                "lower optim.lr, raise optim.warmup_steps or set trainer.gradient_clip_val"
            )
        n = len(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on norms and biases
        groups = [{"params": decay, "weight_decay": float(cfg["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg["name"] == "adamw":
            opt = torch.optim.AdamW(groups, lr=float(cfg["lr"]))
        elif cfg["name"] == "sgd":
            opt = torch.optim.SGD(groups, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]))
        else:
            raise ValueError(f"optim.name must be adamw or sgd, got {cfg['name']!r}")
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        clock, timed = self._time_fraction_clock()
        if not math.isfinite(total):
            # only a wall-time budget bounds the run: the schedule then follows elapsed time alone
            # (a step count guessed from an assumed speed anneals too early or too late)
            total = cfg["total_steps"] or (math.inf if timed else int(cfg["warmup_steps"]) * 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, cfg, clock()))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _time_fraction_clock(self):
        """A function returning the used share of the trainer's ``max_time`` (0 without one), and
        whether there is such a budget."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None) if self._trainer else None
        if timer is None:
            return (lambda: 0.0), False

        def fraction() -> float:
            elapsed = timer.time_elapsed()
            remaining = timer.time_remaining()
            used = 0.0 if remaining is None else elapsed / max(elapsed + remaining, 1e-9)
            if self.trainer.world_size > 1:  # every rank must apply the same learning rate
                used = float(self.trainer.strategy.broadcast(used, src=0))
            return used

        return fraction, True

    # ---------------------------------------------------------------- validation / test
    @property
    def object_diameter(self) -> float | None:
        """Median diameter in pixels of the training objects (``predict.py diameter=...`` resizes
        images relative to it); recorded when training starts, None in older checkpoints."""
        value = self.hparams.get("object_diameter")
        return float(value) if value else None

    @property
    def default_diameter(self) -> str | None:
        """The ``diameter`` mode recommended for this model (:mod:`cellrcnn.inference.scale`);
        None in checkpoints that recommend none (``shrink``)."""
        return self.hparams.get("default_diameter") or None

    @property
    def invert_bright(self) -> bool:
        """Images with a bright background are inverted before this model sees them
        (:func:`cellrcnn.io.prepare_image`); False in older checkpoints."""
        return bool(self.hparams.get("invert_bright", False))

    @property
    def hematoxylin(self) -> bool:
        """Colour-stained tissue reaches this model as its hematoxylin density
        (:func:`cellrcnn.io.prepare_image`); False in older checkpoints."""
        return bool(self.hparams.get("hematoxylin", False))

    @property
    def input_settings(self) -> dict[str, Any]:
        """How images are prepared for this model: keyword arguments (``channels``,
        ``invert_bright``, ``hematoxylin``) of :func:`cellrcnn.io.prepare_image`, ``CocoInstanceDataset`` and
        ``predict_image``, so every entry point feeds it images as it was trained on."""
        return {"channels": int(dict(self.hparams).get("net", {}).get("in_channels", 3)),
                "invert_bright": self.invert_bright, "hematoxylin": self.hematoxylin}

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "invert_bright"):
            self.hparams["invert_bright"] = bool(datamodule.invert_bright)
            self.hparams["hematoxylin"] = bool(getattr(datamodule, "hematoxylin", False))
        if datamodule is None or not getattr(datamodule, "splits", {}).get("train"):
            return
        if self.object_diameter is None:
            if hasattr(datamodule, "training_object_diameter"):  # several sources, rescaled to one size
                self.hparams["object_diameter"] = datamodule.training_object_diameter()
            else:
                from ..data.sizes import annotation_diameter

                self.hparams["object_diameter"] = annotation_diameter(datamodule.annotation_file("train"))
        if hasattr(datamodule, "training_image_digests"):
            # saved with every checkpoint, so scoring a model on images it trained on is caught
            self.training_images = datamodule.training_image_digests()

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()
        self._shown = []

    def validation_step(
        self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        images, targets = batch
        predictions = self.predict_instances(images)
        for image, target, pred in zip(images, targets, predictions, strict=True):
            self.evaluator.update(target, pred)
            if len(self._shown) < self.log_images:
                self._shown.append((image.cpu(), {"masks": target["masks"].cpu()}, pred))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        if not self.trainer.sanity_checking:
            self._log_overlays()

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        self._log_overlays("test")

    def _log_metrics(self, split: str) -> None:
        metrics = self.evaluator.compute()  # already gathered across ranks: identical on each
        for name, value in metrics.items():
            if name.startswith("n_") or not np.isfinite(value):
                continue
            self.log(f"{split}/{name}", float(value), prog_bar=name == "dsb_score", sync_dist=False)
        self.last_metrics = {f"{split}/{k}": v for k, v in metrics.items()}
        names = list(getattr(getattr(self.trainer, "datamodule", None), "source_names", []))
        if len(names) > 1:  # several sources: where the model fails, beside the pooled figures
            from ..data.mixed import source_of_image_id

            for source, values in self.evaluator.compute_groups(lambda i: source_of_image_id(i, names)).items():
                for name in SOURCE_METRICS:
                    if np.isfinite(values.get(name, np.nan)):
                        self.log(f"{split}/{source}/{name}", float(values[name]), sync_dist=False)
                self.last_metrics.update({f"{split}/{source}/{k}": v for k, v in values.items()})

    def _log_overlays(self, split: str = "val") -> None:
        """TP/FP/FN grid of the first images of the epoch to TensorBoard (``<split>/overlay_tp_fp_fn``);
        also kept as ``self.last_overlay`` (H×W×3 uint8) for the caller to save."""
        if not self._shown or self.global_rank != 0:
            return
        from ..viz import tp_fp_fn_grid

        self.last_overlay = tp_fp_fn_grid(self._shown)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(f"{split}/overlay_tp_fp_fn", self.last_overlay, self.global_step, dataformats="HWC")

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint[MODULE_KEY] = f"{cls.__module__}.{cls.__qualname__}"
        if getattr(self, "training_images", None):
            checkpoint[TRAINING_IMAGES_KEY] = list(self.training_images)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.training_images = list(checkpoint.get(TRAINING_IMAGES_KEY, []))


def load_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> InstanceSegModule:
    """Rebuild a trained module from its checkpoint alone (class and hyper-parameters are stored in it)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    try:
        checkpoint = torch.load(ckpt_path, map_location=map_location, weights_only=False)
    except Exception as exc:  # an image, a zip, a truncated download: torch raises unpickling errors of many types
        raise ValueError(f"{ckpt_path}: not a checkpoint file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{ckpt_path}: not a cellrcnn checkpoint (holds a {type(checkpoint).__name__})")
    target = checkpoint.get(MODULE_KEY)
    if target is None:
        raise ValueError(f"{ckpt_path}: not a cellrcnn checkpoint (no 'cellrcnn_module' entry)")
    module_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    model = cls(**checkpoint.get("hyper_parameters", {}))
    model.load_state_dict(checkpoint["state_dict"])
    model.training_images = list(checkpoint.get(TRAINING_IMAGES_KEY, []))
    # what it trained on, for the out-of-distribution warning (written when a model is shipped)
    model.training_profile = dict(checkpoint.get(TRAINING_PROFILE_KEY, {}))
    model.eval()
    return model
