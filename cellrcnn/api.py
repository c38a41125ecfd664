"""The Python API: a trained model as an object that segments images in one call.

    from cellrcnn import Segmenter
    result = Segmenter.from_pretrained("nuclei").segment("image.png")
    print(result.n_objects, result.table.area_px.mean())

A :class:`Segmenter` wraps a checkpoint together with everything ``predict.py`` does around the
network: reading the file, preparing the image as the model was trained (percentile
normalisation, channels, ``invert_bright``), resizing to the training object size
(``diameter``), tiling of large images, and the decision thresholds recorded in the checkpoint.
``predict.py``, the HTTP service (:mod:`cellrcnn.serve`) and notebooks all go through it, so they
give the same label image for the same input.

Shipped models are the ``<name>.ckpt`` files of ``cellrcnn/weights`` (each with a ``<name>.json``
model card); :func:`available_models` lists them.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_DIR = Path(__file__).parent / "weights"

__all__ = ["AutoSegmenter", "Result", "Segmenter", "available_models", "checkpoint_path", "model_card", "WEIGHTS_DIR"]


def available_models(weights_dir: str | Path | None = None) -> dict[str, Path]:
    """``{name: checkpoint path}`` of the shipped models (every ``<name>.ckpt`` in ``weights_dir``)."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return {p.stem: p for p in sorted(folder.glob("*.ckpt"))} if folder.is_dir() else {}


def checkpoint_path(name_or_path: str | Path) -> Path:
    """A checkpoint file, or the file of the shipped model of that name (``nuclei``, ...): what
    ``evaluate.py ckpt_path=`` accepts."""
    path = Path(name_or_path)
    if not path.is_file() and str(name_or_path) in available_models():
        return available_models()[str(name_or_path)]
    return path


def model_card(name: str, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``<name>.json`` card of a shipped model (training data, thresholds, held-out metrics);
    ``{}`` when the model ships without one. Unknown names raise a ValueError listing the models."""
    models = available_models(weights_dir)
    if name not in models:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(models) or 'none'}")
    card = models[name].with_suffix(".json")
    return json.loads(card.read_text()) if card.is_file() else {}


# a 3-D array whose first axis is this short and both others longer holds its channels first
MAX_CHANNELS_FIRST = 8
# Tile overlap (px) of large images. It must exceed the largest object (an object wider than the
# overlap that crosses a seam is dropped, with a warning). The largest object of an image spans
# at most 4-5 times its median diameter in 99 % of the annotated DSB2018 and MoNuSeg images (7 at
# most), hence 6 median diameters, from a quick look at the image; 128 px without one. Not below
# 96 px: the owned part of a tile then keeps 48 px from its edges, where the network sees less
# context (on a 2048² field of 883 held-out DSB2018 nuclei: dsb_score 0.4748 at 128 px, 0.4723 at
# 96, 0.4704 at 64; bench/results/predict_speed/tile_overlap.md).
TILE_OVERLAP = 128
MIN_TILE_OVERLAP = 96
OVERLAP_PER_DIAMETER = 6
OVERLAP_PROBE = 1024


def as_image(image: np.ndarray, channel: int | None = None) -> np.ndarray:
    """An in-memory image -> raw H×W or H×W×3 pixels, as :func:`cellrcnn.io.read_image` gives a file.

    Accepts H×W, H×W×1, H×W×3 and H×W×4 arrays of any dtype (RGBA: alpha is dropped).
    ``channel`` picks one channel (any C, e.g. the DAPI plane of a multi-channel stack) and gives
    a grey image; other channel counts need it (which one holds the nuclei cannot be guessed).
    An array with its channels first (C×H×W, as ``tifffile.imread`` gives a multi-channel TIFF: a
    first axis of at most :data:`MAX_CHANNELS_FIRST` before an image side longer than that) needs
    ``channel`` too: ``tifffile.imread`` gives a 3-plane z-stack or 3 fluorescence channels the
    same shape as planar RGB, and reading them as colour would be a silent mistake.
    """
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.view(np.uint8)
    if image.dtype.kind not in "uif":
        raise ValueError(f"an image must hold numbers, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[0] <= MAX_CHANNELS_FIRST < min(image.shape[1:]):
        if channel is None and image.shape[0] > 1:
            raise ValueError(f"a {'×'.join(map(str, image.shape))} array has {image.shape[0]} channels or z-planes "
                             "first: give channel=K (the nuclei channel) or plane=K (a z-plane); a colour image "
                             "is passed as H×W×3 (np.moveaxis(image, 0, -1))")
        image = np.moveaxis(image, 0, -1)  # C×H×W -> H×W×C, a view
    if channel is not None:
        if image.ndim != 3:
            raise ValueError(f"channel={channel} needs an H×W×C (or C×H×W) image, got shape {image.shape}")
        if not -image.shape[-1] <= int(channel) < image.shape[-1]:
            raise ValueError(f"channel={channel} is out of range for {image.shape[-1]} channels")
        image = image[..., int(channel)]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    elif image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim not in (2, 3) or image.ndim == 3 and image.shape[-1] != 3:
        raise ValueError(f"expected an H×W, H×W×3 or H×W×4 image, got shape {image.shape}; "
                         "pick the nuclei channel with channel=...")
    if min(image.shape[:2]) == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


@dataclass
class Result:
    """The segmentation of one image.

    ``labels``: H×W uint16 label image (uint32 above 65,535 objects), 0 = background, objects
    1..N; ``scores``: float32 N, ``scores[k - 1]`` the model's confidence for label k;
    ``image``: the raw input (H×W or H×W×3, its own dtype); ``info``: how it was predicted
    (``factor``: the resize applied for ``diameter``, 1 = native size). ``table`` (per-cell
    measurements, :func:`cellrcnn.inference.measure`) and ``overlay`` (uint8 H×W×3 outlines over
    the image) are computed on first use.
    """

    labels: np.ndarray
    scores: np.ndarray
    image: np.ndarray
    name: str = ""
    pixel_size: float | None = None  # µm per pixel, for the table's units
    info: dict = field(default_factory=dict)

    @property
    def n_objects(self) -> int:
        return int(len(self.scores))

    @cached_property
    def table(self):
        """pandas DataFrame, one row per object (sizes in px, or µm with ``pixel_size``)."""
        from cellrcnn.inference.measurements import measure

        return measure(self.labels, self.image, self.name, self.scores, self.pixel_size)

    @cached_property
    def overlay(self) -> np.ndarray:
        """uint8 H×W×3: each object's outline in its own colour over the normalised image."""
        from cellrcnn.inference.exports import overlay_outlines

        return overlay_outlines(self.image, self.labels)


class Segmenter:
    """A trained model with its input preparation, object-size and tiling settings.

    Args:
        module: a trained model: a predictor (:func:`cellrcnn.inference.predictor.load_predictor`)
            or a Lightning module (:func:`cellrcnn.modules.base.load_module`).
        name: shown in results and by the service (shipped model name or checkpoint file name).
        checkpoint: where it was loaded from.
        tile_size: images larger than this (pixels, either side) are predicted in overlapping tiles;
            None: the model's own (``preferred_tile_size``: 896 px for the U-Net, which predicts
            images up to 1536 px in one piece, ``whole_image_up_to``; 1024 px for Mask R-CNN).
        tile_overlap: overlap of the tiles in pixels; must exceed the largest object's diameter.
            None (the default): :meth:`tile_overlap_for` each image, from its objects' size.
        score_threshold: override the checkpoint's detection score threshold (Mask R-CNN).
        tta: override the checkpoint's test-time flips (U-Net): True (all four views), False (about
            4x faster), or the number of views 1-4 (:func:`cellrcnn.models.unet.flip_count`).
        polarity: ``auto`` (decided per image), ``bright`` (the objects are brighter than the
            background: fluorescence, however densely the nuclei fill the field) or ``dark``
            (darker: brightfield); see :func:`cellrcnn.io.inverts`.
    """

    def __init__(self, module, name: str = "", checkpoint: str | Path | None = None, tile_size: int | None = None,
                 tile_overlap: int | None = None, score_threshold: float | None = None, tta: bool | int | None = None,
                 polarity: str = "auto"):
        from cellrcnn.inference.predictor import set_score_threshold
        from cellrcnn.io import check_polarity

        self.module = module
        self.name = name
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.tile_size = int(tile_size or getattr(module, "preferred_tile_size", 1024))
        # without a tile_size of the user's, an image up to the model's whole_image_up_to goes in one piece
        self.whole_image_up_to = self.tile_size if tile_size else getattr(module, "whole_image_up_to", self.tile_size)
        self.tile_overlap = None if tile_overlap is None else int(tile_overlap)
        set_score_threshold(module, score_threshold)
        if tta is not None:
            if not hasattr(module, "tta"):
                raise ValueError(f"{type(module).__name__} has no test-time augmentation to switch")
            from cellrcnn.models.unet import flip_count

            flip_count(tta)  # a wrong value fails here, not at the first image
            module.tta = tta
        self.settings = dict(module.input_settings)  # channels, and inversion of bright backgrounds
        self.polarity = check_polarity(polarity)  # the user's word on the objects, where the image misleads

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> Segmenter:
        """Load any cellrcnn checkpoint (``train.py`` writes them) for prediction
        (:func:`cellrcnn.inference.predictor.load_predictor`: without the training stack);
        ``precision``: ``auto``, ``float32`` or ``bfloat16``; other keyword arguments as the class."""
        from cellrcnn.inference.predictor import load_predictor

        path = Path(path)
        predictor = load_predictor(path, precision=kwargs.pop("precision", "auto"))
        return cls(predictor, name=kwargs.pop("name", path.name), checkpoint=path, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str = "nuclei", **kwargs) -> Segmenter | AutoSegmenter:
        """A shipped model by name (:func:`available_models`), or ``"auto"``: a model chosen per image
        (:class:`AutoSegmenter`); an unknown name raises a ValueError that lists the available ones."""
        if name == "auto":
            return AutoSegmenter(**kwargs)
        models = available_models()
        if name not in models:
            raise ValueError(f"unknown model {name!r}; available: {', '.join(models) or 'none'} "
                             "(or Segmenter.from_checkpoint(path) for a model you trained)")
        return cls.from_checkpoint(models[name], name=name, **kwargs)

    @property
    def object_diameter(self) -> float | None:
        """Median object diameter (px) of the training set, when the checkpoint records it."""
        return self.module.object_diameter

    @property
    def default_diameter(self) -> str:
        """The ``diameter`` mode that ``diameter="default"`` means for this model: the one its
        checkpoint recommends (``range`` for ``nuclei``, ``auto`` for ``nuclei_he``), else ``shrink``."""
        from cellrcnn.inference.scale import resolve_diameter

        return resolve_diameter("default", getattr(self.module, "default_diameter", None))

    def _predict_native(self, raw: np.ndarray, progress: bool, quick: bool = False,
                        polarity: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and scores of ``raw`` at its own size; ``quick``: one view only (a U-Net's
        test-time flips off), for the measuring pass of ``diameter=shrink``, ``auto`` and ``range``."""
        from cellrcnn.inference.predictor import prediction_fn
        from cellrcnn.inference.tiling import predict_image

        # tiles only above tile_size; a large image stays raw in memory and is normalised per tile
        # with whole-image percentiles (cellrcnn.inference.tiling)
        predict_fn = prediction_fn(self.module, quick)
        one_piece = max(np.shape(raw)[:2]) <= self.whole_image_up_to
        tile_size = max(self.whole_image_up_to, self.tile_size) if one_piece else self.tile_size
        overlap = 0 if one_piece else self.tile_overlap_for(raw, polarity)
        return predict_image(raw, predict_fn, tile_size=tile_size, overlap=overlap,
                             progress=progress, polarity=polarity or self.polarity, **self.settings)

    def tile_overlap_for(self, raw: np.ndarray, polarity: str | None = None) -> int:
        """The tile overlap of an image too large for one piece: the segmenter's ``tile_overlap``
        when given, else :data:`OVERLAP_PER_DIAMETER` times the median object diameter of one
        quick view of its central :data:`OVERLAP_PROBE` px (rounded up to 16 px, within
        :data:`MIN_TILE_OVERLAP`-:data:`TILE_OVERLAP`; :data:`TILE_OVERLAP` when too few objects
        show). Fields of small nuclei then need fewer tiles (an 8000² field of 13-px nuclei: 100
        instead of 121 of 896 px), and an object wider than the overlap stays rare (see the constants)."""
        from cellrcnn.data.sizes import median_diameter
        from cellrcnn.inference.scale import central_window

        if self.tile_overlap is not None:
            return self.tile_overlap
        # small enough to be predicted in one piece: no tiles, so no overlap to choose again
        window = central_window(raw, min(OVERLAP_PROBE, self.whole_image_up_to))
        measured = median_diameter(self._predict_native(window, False, True, polarity)[0])
        if measured is None:
            return TILE_OVERLAP
        return int(np.clip(16 * math.ceil(OVERLAP_PER_DIAMETER * measured / 16), MIN_TILE_OVERLAP, TILE_OVERLAP))

    @staticmethod
    def read(image: np.ndarray | str | Path, channel: int | None = None, plane: int | None = None) -> np.ndarray:
        """The raw H×W or H×W×3 pixels :meth:`segment` works on, from a file or an array.

        ``plane``: the z-plane (page) of a multi-page TIFF, or the index along the first axis of
        a stacked array (Z×H×W or Z×H×W×C)."""
        from cellrcnn.io import read_image

        if isinstance(image, str | Path):
            # the reader picks the channel itself: it knows a file's colour from its non-colour channels
            return as_image(read_image(image, channel=channel, plane=plane))
        if plane is not None:
            image = np.asarray(image)
            if image.ndim < 3 or not -image.shape[0] <= int(plane) < image.shape[0]:
                raise ValueError(f"plane={plane} needs a stack with that many planes, got shape {image.shape}")
            image = image[int(plane)]
        return as_image(image, channel)

    def segment(self, image: np.ndarray | str | Path, diameter: float | str | None = "default",
                channel: int | None = None, pixel_size: float | None = None, name: str | None = None,
                progress: bool = False, plane: int | None = None, polarity: str | None = None) -> Result:
        """Segment one image.

        Args:
            image: an H×W or H×W×C array (any dtype), or the path of an image file.
            diameter: ``"default"`` (the model's recommended mode: :attr:`default_diameter`),
                ``"shrink"`` (images of objects larger than the training size are shrunk to it),
                ``"range"`` (also enlarged when much smaller), ``"auto"`` (resized to the training
                size either way), None or ``"native"`` (native size), or the
                objects' typical diameter in pixels (see :mod:`cellrcnn.inference.scale`).
            channel: segment only this channel of a multi-channel image.
            pixel_size: µm per pixel: the ``table`` in µm and µm².
            name: the ``image`` column of the table (default: the file name).
            progress: a progress bar over tiles for large images.
            plane: the z-plane of a multi-page TIFF (or of a stacked array) to segment.
            polarity: for this image, instead of the segmenter's (``auto``, ``bright``, ``dark``).
        """
        from cellrcnn.data.sizes import median_diameter
        from cellrcnn.inference.choice import MIN_OBJECTS_FOR_SIZE
        from cellrcnn.inference.scale import check_diameter, predict_at_diameter, resolve_diameter
        from cellrcnn.io import check_polarity, input_polarity, label_dtype

        if isinstance(image, str | Path):
            name = Path(image).name if name is None else name
        raw = self.read(image, channel, plane)
        diameter = resolve_diameter(diameter, getattr(self.module, "default_diameter", None))
        check_diameter(diameter, self.object_diameter, str(self.checkpoint or self.name))
        polarity = self.polarity if polarity is None else check_polarity(polarity)
        labels, scores, info = predict_at_diameter(raw, lambda x: self._predict_native(x, progress, polarity=polarity),
                                                   diameter, self.object_diameter,
                                                   lambda x: self._predict_native(x, False, True, polarity),
                                                   getattr(self.module, "training_profile", None))
        labels = np.asarray(labels)
        labels = labels.astype(label_dtype(int(labels.max(initial=0))), copy=False)
        found = median_diameter(labels, MIN_OBJECTS_FOR_SIZE)
        info = {**info, "median_diameter": None if found is None else round(found, 2), "diameter": diameter,
                "model": self.name, "checkpoint": str(self.checkpoint or self.name),
                "seen_as": input_polarity(raw, self.settings["invert_bright"], self.settings["hematoxylin"], polarity),
                "warnings": self.warnings(raw, labels, info.get("factor", 1.0), found)}
        return Result(labels=labels, scores=np.asarray(scores, np.float32), image=raw, name=name or "",
                      pixel_size=pixel_size, info=info)

    def warnings(self, raw: np.ndarray, labels: np.ndarray, factor: float = 1.0,
                 found: float | None = None) -> list[str]:
        """Why this model's result on ``raw`` should not be trusted ([] when the image looks like its
        training data): :func:`cellrcnn.inference.choice.ood_reasons`; ``found``: the labels'
        :func:`cellrcnn.data.sizes.median_diameter`, when already measured."""
        from cellrcnn.data.sizes import median_diameter
        from cellrcnn.inference.choice import MIN_OBJECTS_FOR_SIZE, ood_reasons

        found = median_diameter(labels, MIN_OBJECTS_FOR_SIZE) if found is None else found
        return ood_reasons(raw, getattr(self.module, "training_profile", None), found, factor)

    def segment_many(self, images: Iterable[str | Path], progress: bool = True, skip_unreadable: bool = True,
                     **kwargs) -> Iterator[Result]:
        """Segment image files one after the other (lazily), with a progress bar; keyword
        arguments as :meth:`segment`. A file that cannot be read (:class:`cellrcnn.io.ImageReadError`,
        naming it and why) is skipped with a warning, as ``predict.py`` skips it, so one bad file
        does not stop a folder; ``skip_unreadable=False`` raises the error instead."""
        from tqdm import tqdm

        from cellrcnn.io import ImageReadError

        images = list(images)
        for path in tqdm(images, desc="segment", unit="image", disable=not progress):
            try:
                result = self.segment(path, **kwargs)
            except ImageReadError as exc:
                if not skip_unreadable:
                    raise
                warnings.warn(f"skipped: {exc}", stacklevel=2)
                continue
            yield result

    def __repr__(self) -> str:
        return (f"Segmenter({self.name!r}, {type(self.module).__name__}, channels={self.settings['channels']}, "
                f"invert_bright={self.settings['invert_bright']}, hematoxylin={self.settings['hematoxylin']}, "
                f"object_diameter={self.object_diameter})")


class AutoSegmenter:
    """The shipped model that suits each image (:func:`cellrcnn.inference.choice.choose_model`:
    colour-stained images to ``nuclei_he`` when installed, the rest to ``nuclei``), loaded on
    first use; :meth:`segment` records the choice and its reason in ``Result.info``.

    Keyword arguments are passed to every :class:`Segmenter` it loads.
    """

    name = "auto"

    def __init__(self, weights_dir: str | Path | None = None, **kwargs) -> None:
        self.models = available_models(weights_dir)
        if not self.models:
            raise ValueError(f"no shipped model in {weights_dir or WEIGHTS_DIR}; give a checkpoint instead")
        self.kwargs = kwargs
        self._loaded: dict[str, Segmenter] = {}
        self._lock = threading.Lock()  # threads of a server must not load one model twice

    def segmenter(self, name: str) -> Segmenter:
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = Segmenter.from_checkpoint(self.models[name], name=name, **self.kwargs)
            return self._loaded[name]

    @property
    def object_diameter(self) -> float | None:
        """The default model's training object size (every shipped model records one)."""
        from cellrcnn.inference.choice import default_model

        return self.segmenter(default_model(self.models)).object_diameter

    @property
    def default_diameter(self) -> dict[str, str]:
        """``{model: diameter mode}``: what ``diameter="default"`` means for each model it may choose."""
        return {name: self.segmenter(name).default_diameter for name in self.models}

    def segment(self, image: np.ndarray | str | Path, channel: int | None = None, **kwargs) -> Result:
        """As :meth:`Segmenter.segment`, with the model chosen from the image's appearance."""
        from cellrcnn.inference.choice import choose_model

        if isinstance(image, str | Path):
            kwargs.setdefault("name", Path(image).name)
        raw = Segmenter.read(image, channel, kwargs.pop("plane", None))
        name, reason = choose_model(raw, self.models, kwargs.get("polarity") or self.kwargs.get("polarity", "auto"))
        result = self.segmenter(name).segment(raw, **kwargs)
        result.info["model_choice"] = reason
        return result

    segment_many = Segmenter.segment_many

    def __repr__(self) -> str:
        return f"AutoSegmenter({', '.join(self.models)})"
