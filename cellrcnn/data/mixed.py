"""Several converted sources in one training run (``data=nuclei_mix``).

Each source is a converted COCO folder with its own images, bit depths, channel counts and
nucleus sizes. Three things make them train together:

- **Sampling weights.** A training epoch draws as many images as all sources hold, with
  replacement; a source's share of the draws is proportional to its ``weight``, whatever its
  size (42 S-BSST265 images would otherwise drown among 600 DSB2018 fields). Within a source,
  images are drawn uniformly, or by appearance group with ``balance=appearance``.
- **A common nucleus size.** With ``target_diameter`` set, every image of a source is resized by
  ``target_diameter / median nucleus diameter of the source's training split`` (clipped to
  ``[1 / max_rescale, max_rescale]``), in training and validation alike, so a 60-px nucleus at
  63x and a 15-px one at 20x reach the network at similar sizes; random scaling (``scale_range``)
  still jitters around it. The model records ``target_diameter`` as its object diameter, so
  ``diameter=...`` / ``diameter=auto`` at inference resize new images the same way.
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
    scale: float = 1.0  # resize factor of its images (towards the common nucleus size)


class SourceView(Dataset):
    """Full-size samples of one source for validation/testing: resized by the source's factor,
    image ids offset so sources stay apart in one evaluator."""

    def __init__(self, base: CocoInstanceDataset, index: int, scale: float = 1.0) -> None:
        self.base, self.offset = base, index * ID_STRIDE
        self.resize = RandomScale((scale, scale), min_area=1) if abs(scale - 1.0) > 1e-3 else None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, target = self.base.load_numpy(i)
        if self.resize is not None:
            image, target = self.resize(image, target, np.random.default_rng(0))
        target = {**target, "image_id": int(target["image_id"]) + self.offset}
        return to_tensors(image, target)


class MixedDataModule(CellDataModule):
    """A :class:`CellDataModule` over several sources (see the module docstring).

    Args:
        sources: ``{name: {"root": folder, "weight": share of the training draws}}``; an entry
            set to null is left out (``data.sources.monuseg=null`` on the command line).
        target_diameter: common median nucleus diameter in px (None: every source at native size).
        max_rescale: largest resize factor either way.
        **kwargs: the :class:`CellDataModule` options, shared by every source.
    """

    def __init__(
        self,
        sources: dict[str, dict | None],
        target_diameter: float | None = None,
        max_rescale: float = 2.0,
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
        self.max_rescale = float(max_rescale)
        self._scales_known = False

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
                                   channels=self.channels, invert_bright=self.invert_bright)

    def resolve_scales(self) -> None:
        """Each source's resize factor from the median nucleus diameter of its training split."""
        if self._scales_known:
            return
        self._scales_known = True
        if self.target_diameter is None:
            return
        from cellrcnn.inference.scale import annotation_diameter

        for source in self.sources:
            path = self.source_annotation_file(source, "train")
            median = annotation_diameter(path) if path.is_file() else None
            if median:
                factor = self.target_diameter / median
                source.scale = float(np.clip(factor, 1.0 / self.max_rescale, self.max_rescale))

    def training_object_diameter(self) -> float | None:
        """The median nucleus diameter the model sees in training (recorded in the checkpoint)."""
        if self.target_diameter is not None:
            return self.target_diameter
        from cellrcnn.inference.scale import annotation_diameter

        return annotation_diameter(self.source_annotation_file(self.sources[0], "train"))

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

    def eval_sets(self, split: str) -> list[tuple[str, CocoInstanceDataset, float]]:
        self.resolve_scales()
        return [(s.name, self._source_dataset(s, split), s.scale) for _, s in self._present(split)]

    def annotation_file(self, split: str) -> Path:
        """The first source's file (single-file callers); use :meth:`eval_sets` for all sources."""
        return self.source_annotation_file(self.sources[0], split)

    # ----------------------------------------------------------------- datasets
    def setup(self, stage: str | None = None) -> None:
        self.resolve_scales()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            if self.splits[split] is None or split in self.datasets:
                continue
            if split == "train":
                parts = []
                for _, source in self._present("train"):
                    lo, hi = self.scale_range or (1.0, 1.0)
                    scale = (lo * source.scale, hi * source.scale)
                    transforms = build_train_transforms(
                        crop_size=self.crop_size if self.augment else None, min_area=self.min_area,
                        flips=self.augment, rot90=self.augment, intensity=self.augment,
                        invert_p=self.invert_p if self.augment else 0.0,
                        scale_range=scale if self.augment and scale != (1.0, 1.0) else None,
                    )
                    parts.append(AugmentedDataset(self._source_dataset(source, "train"), transforms, self._rank_seed()))
                self.datasets["train"] = ConcatDataset(parts)
            else:
                self.datasets[split] = [
                    SourceView(self._source_dataset(source, split), index, source.scale)
                    for index, source in self._present(split)
                ]

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
                    from cellrcnn.data.datamodule import appearance_key

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
