"""Several converted sources in one training run (``data=nuclei_mix``).

Each source is a converted COCO folder with its own images, bit depths, channel counts and
nucleus sizes. Three things make them train together:

- **Sampling weights.** A training epoch draws as many images as all sources hold, with
  replacement; a source's share of the draws is proportional to its ``weight``, whatever its
  size (42 S-BSST265 images would otherwise drown among 600 DSB2018 fields). Within a source,
  images are drawn uniformly, or by appearance group with ``balance=appearance``.
- **A common nucleus size.** With ``target_diameter`` set, every image is resized by
  ``(target_diameter / its median nucleus diameter) ** rescale_strength`` (from its annotations,
  clipped to ``[1 / max_rescale, max_rescale]``), in training and validation alike. Sources differ
  tenfold: DSB2018's nuclei are 8-80 px, most S-BSST265 fields (63x) hold 100-190 px nuclei, its
  tissue sections 20 px. Strength 1 brings every image to the target size, as Cellpose trains;
  the default 0.5 moves each halfway (in log scale), so 180-px nuclei arrive near 60 px and 10-px
  ones near 14: the network still meets the range of sizes users' images have at native
  resolution, while no source sits far outside it. Random scaling (``scale_range``) jitters on
  top. The model records the median diameter it was trained at, so ``diameter=auto`` resizes
  images whose nuclei lie far from it.
- **Per-source validation.** One validation (and test) loader per source, image ids offset by
  ``source index × ID_STRIDE`` so the module can report ``val/<source>/<metric>`` beside the
  pooled metrics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from cellrcnn.data.coco import CocoInstanceDataset, to_tensors
from cellrcnn.data.datamodule import AugmentedDataset, CellDataModule, balanced_weights, collate, seed_worker
from cellrcnn.data.transforms import RandomScale, build_train_transforms

ID_STRIDE = 10_000_000  # image ids of source k are k * ID_STRIDE + the COCO id


def source_of_image_id(image_id: int, names: list[str]) -> str:
    """The source name an offset image id belongs to."""
    return names[min(int(image_id) // ID_STRIDE, len(names) - 1)]


@dataclass
class Source:
    """One converted folder: ``root`` holds ``images/`` and ``annotations/<split>.json``."""

    name: str
    root: Path
    weight: float = 1.0


def image_diameters(dataset: CocoInstanceDataset) -> np.ndarray:
    """Median equivalent nucleus diameter (px) of every image of a dataset, from its annotation
    areas (box-only objects: sqrt(w·h)); nan for an image without objects."""
    from cellrcnn.data.sizes import equivalent_diameter

    out = np.full(len(dataset), np.nan)
    for i, info in enumerate(dataset.images):
        anns = dataset._anns.get(info["id"], [])
        sizes = [float(equivalent_diameter(a["area"])) if a.get("segmentation") and a.get("area")
                 else float(np.sqrt(max(a["bbox"][2] * a["bbox"][3], 0.0))) for a in anns]
        if sizes:
            out[i] = float(np.median(sizes))
    return out


def resize_factors(diameters: np.ndarray, target: float | None, strength: float, max_rescale: float) -> np.ndarray:
    """Per image ``(target / diameter) ** strength`` clipped to ``[1/max_rescale, max_rescale]``;
    1 without a target or without objects."""
    if target is None:
        return np.ones(len(diameters))
    with np.errstate(invalid="ignore", divide="ignore"):
        factors = (float(target) / diameters) ** float(strength)
    return np.where(np.isfinite(factors), np.clip(factors, 1.0 / max_rescale, max_rescale), 1.0)


class ResizedAugmentedDataset(AugmentedDataset):
    """Training samples of one source: each image's resize factor folded into the random scale
    range (so the cheap pre-crop still applies), then the usual augmentation."""

    def __init__(self, base: CocoInstanceDataset, factors: np.ndarray, options: dict, seed: int = 0) -> None:
        super().__init__(base, build_train_transforms(**options), seed)
        self.factors, self.options, self._by_factor = factors, options, {}

    def _transforms(self, factor: float):
        key = round(float(factor), 3)
        if key not in self._by_factor:
            lo, hi = self.options.get("scale_range") or (1.0, 1.0)
            scaled = (lo * key, hi * key)
            self._by_factor[key] = build_train_transforms(
                **{**self.options, "scale_range": None if scaled == (1.0, 1.0) else scaled})
        return self._by_factor[key]

    def __getitem__(self, index: int):
        return self._sample(index, self._transforms(self.factors[index]))


class SourceView(Dataset):
    """Full-size samples of one source for validation/testing: each image resized by its factor,
    image ids offset so sources stay apart in one evaluator."""

    def __init__(self, base: CocoInstanceDataset, index: int, factors: np.ndarray | None = None) -> None:
        self.base, self.offset = base, index * ID_STRIDE
        self.factors = np.ones(len(base)) if factors is None else factors

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, target = self.base.load_numpy(i)
        factor = float(self.factors[i])
        if abs(factor - 1.0) > 1e-3:
            image, target = RandomScale((factor, factor), min_area=1)(image, target, np.random.default_rng(0))
        target = {**target, "image_id": int(target["image_id"]) + self.offset}
        return to_tensors(image, target)


class MixedDataModule(CellDataModule):
    """A :class:`CellDataModule` over several sources (see the module docstring).

    Args:
        sources: ``{name: {"root": folder, "weight": share of the training draws}}``; an entry
            set to null is left out (``data.sources.monuseg=null`` on the command line).
        target_diameter: the nucleus diameter in px every image is resized towards (None: native sizes).
        rescale_strength: 1 resizes each image fully to ``target_diameter``, 0.5 halfway (log scale).
        max_rescale: largest resize factor either way.
        **kwargs: the :class:`CellDataModule` options, shared by every source.
    """

    def __init__(
        self,
        sources: dict[str, dict | None],
        target_diameter: float | None = None,
        rescale_strength: float = 0.5,
        max_rescale: float = 8.0,
        **kwargs,
    ) -> None:
        specs = {name: spec for name, spec in dict(sources).items() if spec is not None}
        if not specs:
            raise ValueError("data.sources lists no source: give at least one {root: ..., weight: ...}")
        self.sources = [Source(name, Path(spec["root"]), float(spec.get("weight", 1.0))) for name, spec in specs.items()]
        bad = [s.name for s in self.sources if not s.weight > 0]
        if bad:
            raise ValueError(f"data.sources: weights must be positive; {bad} are not (set a source to null to drop it)")
        kwargs.pop("root", None)
        super().__init__(root=self.sources[0].root, **kwargs)
        self.target_diameter = float(target_diameter) if target_diameter else None
        self.rescale_strength, self.max_rescale = float(rescale_strength), float(max_rescale)
        self._factors: dict[tuple[str, str], np.ndarray] = {}

    # ----------------------------------------------------------------- sources
    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source_annotation_file(self, source: Source, split: str) -> Path:
        name = self.splits[split]
        if name is None:
            raise ValueError(f"no {split} split configured")
        return source.root / "annotations" / f"{name}.json"

    def _source_dataset(self, source: Source, split: str) -> CocoInstanceDataset:
        return CocoInstanceDataset(self.source_annotation_file(source, split), image_root=source.root / "images",
                                   channels=self.channels, invert_bright=self.invert_bright,
                                   hematoxylin=self.hematoxylin)

    def factors(self, source: Source, split: str, dataset: CocoInstanceDataset | None = None) -> np.ndarray:
        """Resize factor of every image of a source's split (see the module docstring)."""
        key = (source.name, split)
        if key not in self._factors:
            dataset = dataset or self._source_dataset(source, split)
            self._factors[key] = resize_factors(image_diameters(dataset), self.target_diameter,
                                                self.rescale_strength, self.max_rescale)
        return self._factors[key]

    def training_object_diameter(self) -> float | None:
        """Median nucleus diameter of the training images as the model sees them (resized),
        recorded in the checkpoint for ``diameter=...`` at inference."""
        from cellrcnn.data.sizes import equivalent_diameter

        sizes = []
        for _, source in self._present("train"):
            dataset = self._source_dataset(source, "train")
            factors = self.factors(source, "train", dataset)
            for i, info in enumerate(dataset.images):
                areas = [a["area"] for a in dataset._anns.get(info["id"], []) if a.get("area")]
                sizes += list(equivalent_diameter(areas) * factors[i])
        return float(np.median(sizes)) if sizes else None

    def _present(self, split: str) -> list[tuple[int, Source]]:
        found = []
        for index, source in enumerate(self.sources):
            path = self.source_annotation_file(source, split)
            if path.is_file():
                found.append((index, source))
            elif split == "train":
                raise FileNotFoundError(f"{path}: source {source.name!r} has no {split} split; convert it first "
                                        f"(python -m cellrcnn.data.convert {source.name} --src ... --out {source.root})")
            else:
                warnings.warn(f"{path}: source {source.name!r} has no {split} split; not evaluated", stacklevel=2)
        return found

    def eval_sets(self, split: str) -> list[tuple[str, CocoInstanceDataset, np.ndarray]]:
        sets = []
        for _, source in self._present(split):
            dataset = self._source_dataset(source, split)
            sets.append((source.name, dataset, self.factors(source, split, dataset)))
        return sets

    def annotation_file(self, split: str) -> Path:
        """The first source's file (single-file callers); use :meth:`eval_sets` for all sources."""
        return self.source_annotation_file(self.sources[0], split)

    # ----------------------------------------------------------------- datasets
    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            if self.splits[split] is None or split in self.datasets:
                continue
            if split == "train":
                options = self.train_transform_options()
                parts = []
                for _, source in self._present("train"):
                    dataset = self._source_dataset(source, "train")
                    factors = self.factors(source, "train", dataset)
                    parts.append(ResizedAugmentedDataset(dataset, factors, options, self._rank_seed()))
                self.datasets["train"] = ConcatDataset(parts)
            else:
                views = []
                for index, source in self._present(split):
                    dataset = self._source_dataset(source, split)
                    views.append(SourceView(dataset, index, self.factors(source, split, dataset)))
                self.datasets[split] = views

    @property
    def weighted_sampling(self) -> bool:
        return True

    def sample_weights(self) -> np.ndarray:
        """Per training image: its source's weight shared among the source's images (uniformly,
        or by appearance group with ``balance=appearance``); sums to 1."""
        if self._sample_weights is None:
            if "train" not in self.datasets:
                self.setup("fit")
            parts = []
            total = sum(s.weight for _, s in self._present("train"))
            for dataset, (_, source) in zip(self.datasets["train"].datasets, self._present("train"), strict=True):
                if self.balance == "appearance":
                    from cellrcnn.data.appearance import appearance_key

                    within = balanced_weights([appearance_key(dataset.base.load_raw(i)) for i in range(len(dataset))])
                else:
                    within = np.full(len(dataset), 1.0 / max(len(dataset), 1))
                parts.append(within * source.weight / total)
            self._sample_weights = np.concatenate(parts)
        return self._sample_weights

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        if split not in self.datasets:
            self.setup({"val": "validate", "test": "test"}[split])
        return [
            DataLoader(view, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                       collate_fn=collate, worker_init_fn=seed_worker, pin_memory=self.pin_memory,
                       persistent_workers=self.persistent_workers)
            for view in self.datasets[split]
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val") if self.splits["val"] is not None else []

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
