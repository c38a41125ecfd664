"""COCO instance annotations + image folder -> ``(image tensor, Target)``.

Reads any COCO instance JSON: polygons, compressed and uncompressed RLE, box-only
annotations (no ``segmentation`` or an empty list: ``has_mask`` False, mask all zeros),
and images without annotations (empty Target: boxes 0×4, masks 0×H×W).

Choices worth knowing:
- ``iscrowd=1`` regions are skipped: the Target contract has no "ignore" region, and a
  crowd RLE is not one object. A warning counts them once per file.
- Labels are category ids mapped to 1..K in increasing id order (identity for the usual
  single category 1); ``ds.label_names`` gives the name of each label.
- Annotations whose mask decodes to nothing are dropped with a warning; they would give a
  model a zero-area box.
- Structural problems (bad JSON, missing keys, unknown image ids, RLE size differing from
  the image) raise :class:`CocoFormatError` naming the file when the dataset is built;
  an image whose pixel size differs from its entry raises when it is read.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cellrcnn.data.masks import MaskFormatError, check_segmentation, decode_segmentation
from cellrcnn.data.target import Target, make_target
from cellrcnn.io import prepare_image, read_image

TransformFn = Callable[[np.ndarray, dict], tuple[np.ndarray, dict]]


class CocoFormatError(ValueError):
    """A COCO annotation file is malformed; the message names the file and the problem."""


def load_coco_json(path: str | Path) -> dict:
    """Read and check the structure of a COCO instance file (raises CocoFormatError)."""
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"{path}: no such annotation file")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CocoFormatError(f"{path}: not valid JSON ({exc})" if path.stat().st_size else f"{path}: empty file") from exc
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: top level must be an object, got {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise CocoFormatError(f"{path}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: '{key}' must be a list")
    seen: set[int] = set()
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise CocoFormatError(f"{path}: images[{n}] is a {type(img).__name__}, not an object")
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            raise CocoFormatError(f"{path}: images[{n}] lacks {missing}")
        if not _is_int(img["id"]) or not _is_int(img["height"]) or not _is_int(img["width"]) \
                or img["height"] <= 0 or img["width"] <= 0 or not isinstance(img["file_name"], str):
            raise CocoFormatError(f"{path}: images[{n}] needs an integer id, positive integer height and "
                                  f"width and a file_name string (got {_short(img)})")
        if img["id"] in seen:
            raise CocoFormatError(f"{path}: image id {img['id']} listed twice")
        seen.add(img["id"])
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise CocoFormatError(f"{path}: annotations[{n}] is a {type(ann).__name__}, not an object")
        missing = [k for k in ("image_id", "category_id") if k not in ann]
        if missing:
            raise CocoFormatError(f"{path}: annotations[{n}] (id {ann.get('id')}) lacks {missing}")
        if not _is_int(ann["image_id"]) or not _is_int(ann["category_id"]):
            raise CocoFormatError(f"{path}: annotation {ann.get('id', n)} needs integer image_id and category_id")
        if ann["image_id"] not in seen:
            raise CocoFormatError(
                f"{path}: annotation {ann.get('id', n)} points at unknown image id {ann['image_id']}"
            )
        if not ann.get("segmentation") and not ann.get("bbox"):
            raise CocoFormatError(f"{path}: annotation {ann.get('id', n)} has neither segmentation nor bbox")
        bbox = ann.get("bbox")
        if bbox and not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
            raise CocoFormatError(f"{path}: annotation {ann.get('id', n)} bbox {_short(bbox)} is not 4 finite numbers")
    if not isinstance(data.get("categories", []), list):
        raise CocoFormatError(f"{path}: 'categories' must be a list")
    for n, cat in enumerate(data.get("categories", [])):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise CocoFormatError(f"{path}: categories[{n}] needs an integer id (got {_short(cat)})")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


Window = tuple[int, int, int, int]  # (y0, x0, height, width) in pixels


def _extent(ann: dict, h: int, w: int) -> list[float] | None:
    """The xywh box an annotation's geometry covers (its own, not the ``bbox`` field, which may
    disagree); None when it cannot be told cheaply (then the annotation is decoded)."""
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation")
    try:
        if isinstance(seg, dict):
            rle = seg if isinstance(seg.get("counts"), str | bytes) else mask_utils.frPyObjects(seg, h, w)
            return [float(v) for v in mask_utils.toBbox(rle)]
        if isinstance(seg, list) and seg:
            xy = np.concatenate([np.asarray(p, float).reshape(-1, 2) for p in seg])
            lo, hi = xy.min(axis=0), xy.max(axis=0)
            return [lo[0] - 1, lo[1] - 1, hi[0] - lo[0] + 2, hi[1] - lo[1] + 2]  # rasterisation margin
        return [float(v) for v in ann["bbox"]] if not seg and ann.get("bbox") else None
    except (TypeError, ValueError, KeyError):
        return None


class CocoInstanceDataset(Dataset):
    """Instance segmentation samples from a COCO file.

    Args:
        annotation_file: COCO instance JSON.
        image_root: folder of the images; default ``<annotation_file>/../../images``.
        channels: 1 or 3 model input channels (grey repeated, colour averaged).
        invert_bright: invert images with a bright background (see :func:`cellrcnn.io.prepare_image`).
        hematoxylin: colour-stained tissue becomes its hematoxylin density (ditto).
        transforms: optional ``t(image C×H×W float32, target dict of numpy) -> (image, target)``.

    ``ds[i]`` -> (float32 tensor C×H×W percentile-normalised, Target with N kept instances).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_root: str | Path | None = None,
        channels: int = 3,
        transforms: TransformFn | None = None,
        invert_bright: bool = False,
        hematoxylin: bool = False,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = (
            Path(image_root) if image_root is not None else self.annotation_file.parent.parent / "images"
        )
        self.channels = channels
        self.invert_bright, self.hematoxylin = invert_bright, hematoxylin
        self.transforms = transforms
        data = load_coco_json(self.annotation_file)
        self.info = data.get("info", {})
        self.images: list[dict] = sorted(data["images"], key=lambda im: im["id"])
        cat_ids = sorted(
            {c["id"] for c in data.get("categories", [])} | {a["category_id"] for a in data["annotations"]}
        )
        names = {c["id"]: c.get("name", str(c["id"])) for c in data.get("categories", [])}
        self.category_to_label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
        self.label_names = {i + 1: names.get(cid, str(cid)) for i, cid in enumerate(cat_ids)}
        self._anns: dict[int, list[dict]] = defaultdict(list)
        sizes = {im["id"]: (int(im["height"]), int(im["width"])) for im in self.images}
        n_crowd = 0
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                n_crowd += 1
                continue
            seg = ann.get("segmentation")
            if isinstance(seg, dict) and list(seg.get("size", [])) != list(sizes[ann["image_id"]]):
                raise CocoFormatError(
                    f"{self.annotation_file}: annotation {ann.get('id')} mask size {seg.get('size')} "
                    f"differs from image {ann['image_id']} size {list(sizes[ann['image_id']])}"
                )
            if seg:  # geometry and RLE checked once here, so a bad mask stops training at the start
                try:
                    check_segmentation(seg, *sizes[ann["image_id"]])
                except MaskFormatError as exc:
                    raise CocoFormatError(f"{self.annotation_file}: annotation {ann.get('id')}: {exc}") from exc
            self._anns[ann["image_id"]].append(ann)
        if self.images and not any(self._anns.values()):
            warnings.warn(
                f"{self.annotation_file}: {len(self.images)} images but no object annotations: a model "
                "trained on it learns to find nothing, and every metric on it is trivially perfect",
                stacklevel=2,
            )
        if n_crowd:
            warnings.warn(
                f"{self.annotation_file}: skipped {n_crowd} iscrowd annotations (not single objects)",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.images)

    def image_info(self, index: int) -> dict:
        """The COCO image entry (``id``, ``file_name``, ``height``, ``width``, ...)."""
        return self.images[index]

    def image_path(self, index: int) -> Path:
        return self.image_root / self.images[index]["file_name"]

    def load_raw(self, index: int) -> np.ndarray:
        """Raw pixels H×W(×3) of image ``index``, checked against the annotated size."""
        info = self.images[index]
        path = self.image_path(index)
        raw = read_image(path)
        if raw.shape[:2] != (int(info["height"]), int(info["width"])):
            raise CocoFormatError(
                f"{self.annotation_file}: image {path} is {raw.shape[0]}×{raw.shape[1]} (H×W) but its entry "
                f"says {info['height']}×{info['width']}"
            )
        return raw

    def load_target(self, index: int, window: Window | None = None, min_area: int = 1) -> dict:
        """Numpy target dict (boxes xyxy float32, labels, masks uint8 N×H×W, has_mask, image_id).

        ``window=(y0, x0, h, w)``: only the instances that reach into it, masks and boxes cropped to
        it; instances left with fewer than ``min_area`` pixels there (unless that is all of them)
        are dropped, as a random crop drops them. Instances whose box misses the window are never
        decoded: a dense 1000² field (MoNuSeg, ~570 nuclei) then costs what its crop costs.
        """
        info = self.images[index]
        full_h, full_w = int(info["height"]), int(info["width"])
        y0, x0, h, w = window if window is not None else (0, 0, full_h, full_w)
        boxes, labels, masks, has_mask = [], [], [], []
        for ann in self._anns.get(info["id"], []):
            seg = ann.get("segmentation")
            reach = _extent(ann, full_h, full_w) if window is not None else None
            if reach is not None:
                bx, by, bw, bh = reach
                if bx >= x0 + w or by >= y0 + h or bx + bw <= x0 or by + bh <= y0:
                    continue
            if seg:
                try:
                    mask = decode_segmentation(seg, full_h, full_w)
                except ValueError as exc:  # MaskFormatError, or pycocotools' bare ValueError
                    raise CocoFormatError(
                        f"{self.annotation_file}: annotation {ann.get('id')}: {exc}"
                    ) from exc
                if window is not None:
                    whole = int(np.count_nonzero(mask))
                    mask = np.ascontiguousarray(mask[y0 : y0 + h, x0 : x0 + w])
                    if 0 < np.count_nonzero(mask) < min(min_area, whole) or not mask.any() and whole:
                        continue  # cut away by the window
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                if rows.size == 0:
                    warnings.warn(
                        f"{self.annotation_file}: annotation {ann.get('id')} of image {info['id']} has an "
                        "empty mask; dropped",
                        stacklevel=2,
                    )
                    continue
                box = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
                has_mask.append(True)
            else:  # box-only annotation: keep the box, the mask stays empty
                x, y, bw, bh = map(float, ann["bbox"])
                x, y = x - x0, y - y0
                box = [max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)]
                if box[2] <= box[0] or box[3] <= box[1]:
                    if window is not None:
                        continue
                    warnings.warn(
                        f"{self.annotation_file}: annotation {ann.get('id')} box {ann['bbox']} is empty "
                        f"inside the {h}×{w} image; dropped",
                        stacklevel=2,
                    )
                    continue
                mask = np.zeros((h, w), np.uint8)
                has_mask.append(False)
            boxes.append(box)
            labels.append(self.category_to_label[ann["category_id"]])
            masks.append(mask)
        return {
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
            "masks": np.stack(masks) if masks else np.zeros((0, h, w), np.uint8),
            "has_mask": np.asarray(has_mask, bool),
            "image_id": int(info["id"]),
        }

    def load_numpy(self, index: int, window: Window | None = None, min_area: int = 1) -> tuple[np.ndarray, dict]:
        """(image float32 C×H×W, numpy target) before transforms; ``window`` as :meth:`load_target`
        (the image is normalised as a whole, then cropped)."""
        image = prepare_image(self.load_raw(index), self.channels, self.invert_bright, self.hematoxylin)
        if window is not None:
            y0, x0, h, w = window
            image = np.ascontiguousarray(image[:, y0 : y0 + h, x0 : x0 + w])
        return image, self.load_target(index, window, min_area)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image, target = self.load_numpy(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return to_tensors(image, target)


def to_tensors(image: np.ndarray, target: dict) -> tuple[torch.Tensor, Target]:
    """Numpy image/target -> float32 tensor C×H×W and a torch Target."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return tensor, make_target(
        target["boxes"],
        target["labels"],
        np.ascontiguousarray(target["masks"]),
        target["has_mask"],
        target["image_id"],
    )
