"""Checks of a command's options and inputs that run before any work starts.

Each raises a :class:`~cellrcnn.errors.UsageError` whose message names the problem and whose
hint is the command or setting that fixes it, so ``cellrcnn predict`` does not create its output
folder or load a model for an input that does not exist, and ``cellrcnn train`` under DDP fails
once, in the launching process, instead of in every rank.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from .config_types import check_types
from .errors import UsageError
from .io import IMAGE_SUFFIXES, POLARITIES, ImageReadError, read_image

KNOWN_EXPORTS = ("geojson", "imagej")  # besides the label TIFF and overlay written always / by `overlays`


def check_predict(cfg: DictConfig) -> None:
    """``cellrcnn predict``: the input holds images, the options fit together, the model exists."""
    check_types(cfg)
    require_values(cfg, "predict", input="an image file or a folder of images", output="the folder for the results")
    source = Path(str(cfg.input))
    if not source.exists():
        raise UsageError(f"input={source}: no such file or folder", "pass an image file or a folder of images")
    if source.is_dir():
        files = [p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")]
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
            raise UsageError(
                f"input={source}: no images in this folder ({len(files)} other file(s))",
                f"images must end in {', '.join(IMAGE_SUFFIXES)}; sub-folders are not searched",
            )
    elif source.suffix.lower() not in IMAGE_SUFFIXES:
        try:  # an unusual suffix may still hold an image (e.g. .npy): only reading it tells
            read_image(source)
        except ImageReadError as exc:
            raise UsageError(
                f"input={source}: not an image file ({exc})", f"pass a {', '.join(IMAGE_SUFFIXES)} file or a folder"
            ) from None
    check_output_folder(Path(str(cfg.output)))
    if cfg.get("ckpt_path") and not Path(str(cfg.ckpt_path)).is_file():
        raise UsageError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint",
                         "train.py writes them to outputs/<name>/<time>/checkpoints/; omit ckpt_path for the shipped model")
    if not cfg.get("ckpt_path"):
        from .api import available_models

        shipped = available_models()
        if str(cfg.get("model") or "auto") not in ("auto", *shipped):
            raise UsageError(f"model={cfg.model}: no such shipped model",
                             f"choose auto, {', '.join(shipped) or '(none installed)'}, or pass ckpt_path= for a model you trained")
    if cfg.get("anomaly") and not cfg.get("measure"):
        raise UsageError("anomaly=true flags cells by their shape measurements, which measure=false does not compute",
                         "add measure=true")
    unknown = sorted(set(cfg.get("exports") or ()) - set(KNOWN_EXPORTS))
    if unknown:
        raise UsageError(f"exports: unknown format(s) {unknown}", f"choose from {list(KNOWN_EXPORTS)}, e.g. exports=[geojson]")
    if cfg.get("table_format", "csv") not in ("csv", "parquet"):
        raise UsageError(f"table_format={cfg.table_format}", "use table_format=csv or table_format=parquet")
    if cfg.get("table_format") == "parquet" and cfg.get("measure"):
        _require("pyarrow", "table_format=parquet", "parquet")
    check_diameter_value(cfg.get("diameter"))
    if str(cfg.get("polarity") or "auto") not in POLARITIES:
        raise UsageError(f"polarity={cfg.polarity}", "use polarity=auto (read from each image), bright (the objects "
                         "are brighter than the background: fluorescence) or dark (darker: brightfield)")


def check_output_folder(output: Path) -> None:
    """Results can be written to ``output``: it, or the nearest existing folder above it (where it
    will be created), is a folder a file can really be made in. ``os.access`` would say yes to root
    on a read-only file system, and otherwise the first write fails after an image was predicted."""
    # os.path.exists: a folder the user may not look into counts as absent, and is found unwritable above
    existing = next(path for path in (output, *output.parents) if os.path.exists(path))
    if not existing.is_dir():
        message = f"output={output}" + (" is a file" if existing == output else f": {existing} is a file")
        raise UsageError(message, "output names a folder (created if absent)")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".cellrcnn-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"output={output}: cannot write in {existing} ({exc.strerror or exc})",
                         "choose an output folder you can write to") from None


def check_evaluate(cfg: DictConfig) -> None:
    """``cellrcnn evaluate``: the checkpoint exists and the diameter option is valid."""
    check_types(cfg)
    from .api import available_models, checkpoint_path

    require_values(cfg, "evaluate", ckpt_path="the trained model (a .ckpt file) or a shipped model's name")
    if not checkpoint_path(str(cfg.ckpt_path)).is_file():
        raise UsageError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint",
                         "train.py writes them to outputs/<name>/<time>/checkpoints/ (calibrated.ckpt, last.ckpt); "
                         f"shipped models: {', '.join(available_models()) or 'none installed'}")
    diameter = cfg.get("diameter")
    check_diameter_value(None if diameter == "gt" else diameter)  # gt: each image at its annotated size


def require_values(cfg: DictConfig, command: str, **meaning: str) -> None:
    """Every key of ``meaning`` was given on the command line (they are ``???`` in the config)."""
    from omegaconf import OmegaConf

    missing = [key for key in meaning if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise UsageError(
            "missing " + ", ".join(f"{key}= ({meaning[key]})" for key in missing),
            f"e.g. cellrcnn {command} " + " ".join(f"{key}=..." for key in meaning) + f"; cellrcnn {command} --help",
        )


def check_diameter_value(diameter) -> None:
    """``diameter`` is null (or ``native``), ``default``, ``shrink``, ``auto``, ``range`` or a positive number of pixels."""
    if diameter is None or diameter in ("auto", "shrink", "range", "default", "native"):
        return
    if isinstance(diameter, bool) or not isinstance(diameter, (int, float)) or diameter <= 0:
        raise UsageError(f"diameter={diameter}", "diameter is the objects' typical diameter in pixels (e.g. 30), "
                         "default (the model's recommended mode), shrink (images of objects larger than the training "
                         "ones shrunk), auto (measured per image, shrunk or enlarged), range (shrunk as shrink does, "
                         "enlarged as auto does) or null / native (native size)")


def check_dataset(datamodule, splits: tuple[str, ...], data_choice: str | None = None) -> dict[str, int]:
    """The annotation files of ``splits`` exist; returns ``{split: number of images}``.

    A missing file raises with the ``cellrcnn convert`` command that writes it (``data_choice`` is
    the data config's name, e.g. ``bbbc038``); empty splits are reported by the caller, which knows
    what each split is used for.
    """
    counts = {}
    for split in splits:
        if datamodule.splits.get(split) is None:
            continue
        path = datamodule.annotation_file(split)
        if not path.is_file():
            source = data_choice if data_choice and data_choice != "synthetic" else "SOURCE"
            raise UsageError(
                f"{path}: no such annotation file (the {split} split of data.root={datamodule.root})",
                f"convert the dataset first: cellrcnn convert {source} --src DOWNLOAD --out {datamodule.root} "
                "(cellrcnn convert list shows the sources; `folder` takes your own images + label images), "
                "or set data.root to a converted dataset",
            )
        try:
            counts[split] = len(json.loads(path.read_text()).get("images", []))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable COCO file ({exc})",
                             f"check it with: cellrcnn convert validate {datamodule.root}") from None
    return counts


def check_training(cfg: DictConfig, datamodule) -> None:
    """``cellrcnn train``: the packages the run needs are installed, the dataset exists (the
    synthetic one is generated here), and an empty validation or test split is said out loud."""
    check_types(cfg)
    logger_target = str((cfg.get("logger") or {}).get("_target_", ""))
    if logger_target.endswith("TensorBoardLogger") and not (_have("tensorboard") or _have("tensorboardX")):
        raise UsageError("logger=tensorboard needs the tensorboard package",
                         "pip install 'cellrcnn[train]', or choose logger=csv or logger=none")
    datamodule.prepare_data()  # generates the synthetic dataset on first use
    if hasattr(datamodule, "sources"):  # several sources: each must have its training split
        for source in datamodule.sources:
            path = datamodule.source_annotation_file(source, "train")
            if not path.is_file():
                raise UsageError(f"{path}: no such annotation file (source {source.name!r})",
                                 f"convert it first: cellrcnn convert {source.name} --src DOWNLOAD --out {source.root}")
        return
    choice = hydra_choice("data")
    counts = check_dataset(datamodule, ("train", "val", "test") if cfg.get("test") else ("train", "val"), choice)
    if counts.get("train") == 0:
        raise UsageError(f"{datamodule.annotation_file('train')}: the training split holds no images",
                         "convert more images, or choose other splits with --splits when converting")
    for split, lost in (("val", "no validation metrics, no best checkpoint (the final weights are tested) and no "
                                "threshold calibration"), ("test", "no test metrics after training")):
        if counts.get(split) == 0:
            print(f"warning: the {split} split ({datamodule.annotation_file(split)}) holds no images: {lost}.\n"
                  f"  hint: give it images when converting (cellrcnn convert ... --splits 70,15,15), or point "
                  f"data.{split}_split at a COCO file of other annotated images")


def check_evaluation_data(datamodule, split: str) -> None:
    """``cellrcnn evaluate``: the split to score exists, in one source at least (a source without
    it is left out with a warning), with the conversion that writes it when it does not."""
    if not hasattr(datamodule, "sources"):
        check_dataset(datamodule, (split,), hydra_choice("data"))
        return
    paths = [(source, datamodule.source_annotation_file(source, split)) for source in datamodule.sources]
    missing = [(source, path) for source, path in paths if not path.is_file()]
    if len(missing) == len(datamodule.sources):
        raise UsageError(f"no source has a {split} split: " + ", ".join(str(path) for _, path in missing),
                         "convert them first: " + "; ".join(
                             f"cellrcnn convert {source.name} --src DOWNLOAD --out {source.root}"
                             for source, _ in missing))


def hydra_choice(group: str) -> str | None:
    """The option chosen for a config group in the running Hydra job (None outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        return None


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _require(module: str, what: str, extra: str) -> None:
    if not _have(module):
        raise UsageError(f"{what} needs the {module} package", f"pip install 'cellrcnn[{extra}]'")
