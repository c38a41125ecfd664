"""``python train.py``: fit a model on a dataset, then evaluate it on the test split.

Only :func:`run` sees the Hydra config; everything it builds is a ``_target_`` with explicit
keyword arguments (``cellrcnn/conf/``).
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, Timer
from omegaconf import DictConfig

from .config import CONF_DIR, compose_config  # noqa: F401  (re-exported for notebooks and tests)
from .evaluation.tables import metrics_table
from .preflight import check_training, hydra_choice
from .viz import save_png


def _output_dir(cfg: DictConfig) -> Path:
    """The Hydra run folder (the working directory when run without Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd()


def build_callbacks(cfg: DictConfig, with_logger: bool) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not with_logger:  # the learning-rate monitor needs a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def calibrate_thresholds(
    model: L.LightningModule, datamodule, n_images: int, trainer: L.Trainer, out_dir: Path,
    deadline: float | None = None,
) -> bool:
    """Choose the model's decision thresholds on up to ``n_images`` validation images
    (:mod:`cellrcnn.evaluation.calibrate`, as StarDist optimises its thresholds after training),
    then save ``checkpoints/calibrated.ckpt`` and ``calibration.json``; False when there are no
    validation images.

    Rank 0 alone calibrates, with the CPU threads of the ranks that wait for it, and takes no
    further image after ``deadline`` (:func:`time.monotonic`); the choice is broadcast to every rank."""
    from .evaluation.calibrate import calibrate

    update = report = None
    if trainer.is_global_zero:
        try:  # spread over every source's validation images, as validation sees them
            samples = datamodule.calibration_samples(n_images)
        except FileNotFoundError as exc:
            print(f"no validation annotations ({exc}): thresholds left as configured")
            samples = []
        threads = torch.get_num_threads()
        if trainer.world_size > 1 and model.device.type == "cpu":  # the other local ranks idle meanwhile
            torch.set_num_threads(min(os.cpu_count() or 1, threads * trainer.num_devices))
        try:
            if samples:
                update, report = calibrate(model, samples, deadline=deadline)
        finally:
            torch.set_num_threads(threads)
    if trainer.world_size > 1:
        update, report = trainer.strategy.broadcast((update, report), src=0)
        if report is not None and not trainer.is_global_zero:
            model.apply_thresholds(report["chosen"])
    if report is None:
        return False
    model.hparams.update(update)  # saved with the checkpoint: load_module rebuilds the calibrated model
    trainer.save_checkpoint(out_dir / "checkpoints" / "calibrated.ckpt")
    if trainer.is_global_zero:
        (out_dir / "calibration.json").write_text(json.dumps(report, indent=1))
        print(
            f"calibrated on {report['n_images']} validation images: {report['chosen']} "
            f"(dsb_score {report['previous_dsb_score']:.3f} -> {report['dsb_score']:.3f}); "
            f"weights with these thresholds: {out_dir / 'checkpoints' / 'calibrated.ckpt'}"
        )
    return True


def budget_seconds(max_time) -> float | None:
    """``trainer.max_time`` ("DD:HH:MM:SS", a mapping of timedelta fields, or None) in seconds."""
    if max_time is None:
        return None
    if isinstance(max_time, str):
        days, hours, minutes, seconds = (int(v) for v in max_time.split(":"))
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
    return timedelta(**dict(max_time)).total_seconds()


def load_weights(model: L.LightningModule, ckpt_path: str | Path) -> None:
    """Copy a checkpoint's weights into ``model`` (same architecture); optimiser, schedule and
    budget start afresh, as when a generalist model is fine-tuned on more data."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("state_dict")
    if state is None:
        raise ValueError(f"init_weights={ckpt_path}: not a Lightning checkpoint (no state_dict)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"init_weights={ckpt_path}: weights do not fit the configured model "
                         f"(same model.net settings needed): {str(exc).splitlines()[0]}") from exc
    print(f"initialised the weights from {ckpt_path}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.trainer``; returns the validation metrics of the
    tested weights (``val/...``) and the test metrics (``test/...``); {} after ``fast_dev_run``."""
    start = time.perf_counter()
    start_clock = time.monotonic()  # the wall-time budget counts from here
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)
    out_dir = _output_dir(cfg)

    datamodule = instantiate(cfg.data)
    check_training(cfg, datamodule)  # a missing dataset or package fails here, once, before DDP starts its ranks
    model = instantiate(cfg.model)
    if cfg.get("init_weights"):
        load_weights(model, cfg.init_weights)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = build_callbacks(cfg, with_logger=bool(logger))
    budget = budget_seconds(cfg.trainer.get("max_time"))
    calibrating = bool(cfg.get("test") and cfg.get("calibrate"))
    overrides = {}
    if budget is not None and calibrating:  # the calibration after training is part of the budget
        overrides["max_time"] = timedelta(seconds=budget * (1.0 - float(cfg.get("calibrate_share", 0.1))))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **overrides)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if getattr(trainer, "fast_dev_run", False):
        return {}
    # the weights at the end of training: ModelCheckpoint(save_last=True) refreshes last.ckpt
    # only when it saves a new best, so without this the final (annealed) weights are lost
    last = out_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint is not None else ""
    use_best = cfg.get("test_weights", "best") == "best" and best
    # the validation metrics of the weights that are tested: what `cellrcnn train` returns to sweepers
    validation = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if use_best and checkpoint.best_model_score is not None:
        validation[checkpoint.monitor] = float(checkpoint.best_model_score)
    if not cfg.get("test") or trainer.interrupted:
        return validation

    tested = Path(best) if use_best else last
    calibrated = False
    if calibrating:
        if use_best:  # calibrate the weights that are tested
            model.load_state_dict(torch.load(best, map_location=model.device, weights_only=False)["state_dict"])
        # a resumed leg: the Timer restored the training time of the earlier legs, which the budget already spent
        earlier = next((float(getattr(c, "_offset", 0.0)) for c in trainer.callbacks if isinstance(c, Timer)), 0.0)
        deadline = start_clock + budget - earlier if budget is not None else None
        calibrated = calibrate_thresholds(model, datamodule, int(cfg.calibrate), trainer, out_dir, deadline)
        if calibrated:  # the same weights, with the chosen thresholds
            tested = out_dir / "checkpoints" / "calibrated.ckpt"
    trainer.test(model, datamodule=datamodule, ckpt_path=str(tested), verbose=False)
    metrics = {k: float(v) for k, v in model.last_metrics.items()}
    if trainer.is_global_zero:
        weights = f"best checkpoint {best}" if use_best else "final weights"
        weights += ", calibrated thresholds" if calibrated else ""
        title = f"{cfg.get('name', 'run')}: test split, {weights}"
        table = metrics_table({k.removeprefix("test/"): v for k, v in metrics.items()}, title)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (out_dir / "metrics.md").write_text(table + "\n")
        if model.last_overlay is not None:
            save_png(out_dir / "test_overlay_tp_fp_fn.png", model.last_overlay)
        print("\n" + table)
        # the test step sees images as validation does (mixed sources: resized by their annotated
        # nucleus size); evaluate.py predicts as predict.py does, measuring the sizes itself
        data = hydra_choice("data") or "<the same data>"
        print(f"\nScored at the training scale, as validation is; scored as predict.py predicts: "
              f"python evaluate.py ckpt_path={tested} data={data} split=test")
        print(f"\nrun folder: {out_dir}  (wall time {time.perf_counter() - start:.0f} s since start of run)")
    return {**validation, **metrics}


if __name__ == "__main__":  # python -m cellrcnn.train
    from cellrcnn.cli import train as main

    main()
