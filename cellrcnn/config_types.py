"""Types of the config values users override most, checked when a command starts.

Hydra accepts ``data.batch_size=abc`` or ``tile_size=abc`` as strings; without a check the run
fails late (after loading data or a model) with an error that does not name the key. Each rule
here names the key, the value given and what it must be. Keys a config does not have are skipped,
so one table serves train, evaluate and predict.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from .errors import UsageError

Rule = tuple[str, Callable[[object], bool]]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _optional(rule: Rule) -> Rule:
    return f"null or {rule[0]}", lambda v: v is None or rule[1](v)


INT: Rule = ("an integer", _int)
POS_INT: Rule = ("a positive integer", lambda v: _int(v) and v > 0)
NONNEG_INT: Rule = ("an integer >= 0", lambda v: _int(v) and v >= 0)
POS_NUM: Rule = ("a positive number", lambda v: _num(v) and v > 0)
NONNEG_NUM: Rule = ("a number >= 0", lambda v: _num(v) and v >= 0)
FRACTION: Rule = ("a number from 0 to 1", lambda v: _num(v) and 0 <= v <= 1)
CHANNELS: Rule = ("1 or 3", lambda v: v in (1, 3) and _int(v))

TYPES: dict[str, Rule] = {
    "seed": INT,
    "threads": _optional(POS_INT),
    "calibrate": ("an integer >= 0 (images) or false", lambda v: v is False or (_int(v) and v >= 0)),
    "data.batch_size": POS_INT,
    "data.eval_batch_size": _optional(POS_INT),
    "data.num_workers": NONNEG_INT,
    "data.crop_size": _optional(POS_INT),
    "data.channels": CHANNELS,
    "data.min_area": NONNEG_NUM,
    "data.invert_p": FRACTION,
    "data.seed": INT,
    "trainer.max_epochs": _optional(INT),
    "trainer.max_steps": INT,
    "trainer.accumulate_grad_batches": POS_INT,
    "trainer.check_val_every_n_epoch": _optional(POS_INT),
    "trainer.gradient_clip_val": _optional(NONNEG_NUM),
    "trainer.log_every_n_steps": POS_INT,
    "model.optim.lr": POS_NUM,
    "model.optim.weight_decay": NONNEG_NUM,
    "model.optim.warmup_steps": NONNEG_INT,
    "model.score_threshold": FRACTION,
    "model.mask_threshold": FRACTION,
    "tile_size": _optional(POS_INT),
    "tile_overlap": _optional(NONNEG_INT),
    "score_threshold": _optional(FRACTION),
    "tta": ("null, true, false or a number of views 1-4",
            lambda v: v is None or isinstance(v, bool) or (_int(v) and 1 <= v <= 4)),
    "precision": ("auto, float32 or bfloat16", lambda v: v in ("auto", "float32", "bfloat16")),
    "pixel_size": _optional(POS_NUM),
    "channel": _optional(NONNEG_INT),
    "plane": _optional(NONNEG_INT),
}

_ABSENT = object()


def check_types(cfg: DictConfig) -> None:
    """Raise :class:`~cellrcnn.errors.UsageError` naming the first key whose value has the wrong type."""
    for key, (meaning, ok) in TYPES.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        except Exception:  # an interpolation that cannot resolve here (e.g. ${hydra:...}) is not ours to judge
            continue
        if value is _ABSENT or value == "???":  # not in this config, or a required value still to give
            continue
        if not ok(value):
            raise UsageError(f"{key}={value!r}: expected {meaning}", f"e.g. {key}={_example(meaning)}")


def _example(meaning: str) -> str:
    if "0 to 1" in meaning:
        return "0.5"
    if "1 or 3" in meaning:
        return "3"
    return "8" if "integer" in meaning else "0.001"
