"""LightningDataModule over a COCO dataset root, plus deterministic hash splits.

Batches are ``(list[Tensor C×H×W], list[Target])`` (torchvision detection style): images
keep their own sizes. Training samples are augmented (random crop to ``crop_size``, flips,
rot90, intensity jitter); validation and test images are full, uncropped images.

Determinism: the DataLoader gets a ``torch.Generator`` seeded with ``seed`` (it fixes the
shuffling and the per-epoch base seed of every worker), and every training sample draws its
augmentation generator from the process's seeded torch RNG: the main process's own
generator when ``num_workers=0``, the worker's (seeded by torch from the base seed; numpy
and ``random`` are seeded in :func:`seed_worker`) otherwise. The same seed and
``num_workers`` give the same batches (0 and >0 workers give different, equally valid
streams). Under DDP Lightning swaps in a distributed sampler, and the seed is offset by the
global rank so ranks do not repeat each other's augmentations. Every training epoch is
reseeded from (seed, rank, epoch) (:mod:`cellrcnn.data.samplers`) and the data module's
``state_dict`` (saved in checkpoints) holds the process RNGs, so a run resumed from ``last.ckpt``
continues with the weights an uninterrupted run reaches (one process).

Balanced sampling (``balance="appearance"``): public nuclei sets are dominated by one
modality (two thirds of DSB 2018 are small fluorescence fields) while the rare ones (H&E,
brightfield, large nuclei) are where models fail. Images are grouped by how they were acquired
(size, colour, background polarity) and drawn with probability proportional to
``1 / sqrt(group size)``: a rare group is seen more often, the common one still most.
"""

from __future__ import annotations

import json
import random
from collections.abc import Hashable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from cellrcnn.data.appearance import appearance_key  # noqa: F401  (re-exported)
from cellrcnn.data.coco import CocoInstanceDataset, to_tensors
from cellrcnn.data.samplers import EpochRandomSampler, EpochWeightedRandomSampler
from cellrcnn.data.splits import split_by_hash  # noqa: F401  (re-exported: the one split rule)
from cellrcnn.data.target import Target
from cellrcnn.data.transforms import Compose, build_train_transforms


def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """[(image, target), ...] -> ([images], [targets]) without stacking (sizes differ)."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class AugmentedDataset(Dataset):
    """A CocoInstanceDataset whose samples pass through seeded numpy transforms."""

    def __init__(self, base: CocoInstanceDataset, transforms: Compose, seed: int = 0) -> None:
        self.base, self.transforms = base, transforms
        self._main_rng = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.base)

    def _sample_rng(self) -> np.random.Generator:
        # in a worker the default torch RNG was seeded by the DataLoader (base seed + worker id)
        generator = None if get_worker_info() is not None else self._main_rng
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return np.random.default_rng(seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return self._sample(index, self.transforms)

    def _sample(self, index: int, transforms: Compose) -> tuple[torch.Tensor, Target]:
        rng = self._sample_rng()
        window, min_area = first_window(transforms, self.base.image_info(index), rng)
        image, target = self.base.load_numpy(index, window, min_area)
        image, target = transforms(image, target, rng)
        return to_tensors(image, target)


def first_window(transforms: Compose, info: dict, rng: np.random.Generator):
    """``(window, min_area)``: the random window the first crop of ``transforms`` would take from an
    image of ``info``'s size, drawn up front so only that window is loaded (``None``: the whole
    image, when it is not larger)."""
    from cellrcnn.data.transforms import CropAtMost, RandomCrop

    steps = getattr(transforms, "transforms", [])
    crops = [t for t in steps if isinstance(t, RandomCrop)]
    if not steps or not isinstance(steps[0], RandomCrop):
        return None, 1
    min_area = next((t.min_area for t in crops if not isinstance(t, CropAtMost)), 1)
    (th, tw), h, w = steps[0].size, int(info["height"]), int(info["width"])
    if h <= th and w <= tw:
        return None, min_area
    th, tw = min(th, h), min(tw, w)
    y0, x0 = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
    return (y0, x0, th, tw), min_area


def balanced_weights(keys: Sequence[Hashable]) -> np.ndarray:
    """Sampling weight of every item, ``1 / sqrt(size of its group)``, normalised to sum 1."""
    counts: dict[Hashable, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    weights = np.array([counts[key] ** -0.5 for key in keys], dtype=np.float64)
    return weights / weights.sum()


def split_coco_file(
    annotation_file: str | Path,
    names: Sequence[str] = ("train", "val"),
    fractions: Sequence[float] = (0.9, 0.1),
    salt: str = "",
    out_dir: str | Path | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<name>.json`` per split of a COCO file, by :func:`split_by_hash` of image ids."""
    from cellrcnn.data.coco import load_coco_json

    annotation_file = Path(annotation_file)
    if len(names) != len(fractions):
        raise ValueError(f"{len(names)} names for {len(fractions)} fractions")
    data = load_coco_json(annotation_file)
    out_dir = Path(out_dir) if out_dir is not None else annotation_file.parent
    groups = split_by_hash([im["id"] for im in data["images"]], fractions, salt)
    paths = []
    for name, ids in zip(names, groups, strict=True):
        keep = set(ids)
        part = dict(data)
        part["images"] = [im for im in data["images"] if im["id"] in keep]
        part["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        part["info"] = {**data.get("info", {}), "split": name, "split_salt": salt}
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(part))
        paths.append(path)
    return paths


class CellDataModule(L.LightningDataModule):
    """Train/val/test loaders over ``<root>/annotations/<split>.json`` and ``<root>/images``.

    Args:
        root: dataset root (COCO layout of DESIGN.md).
        train_split, val_split, test_split: split names (or paths to COCO files); None skips.
        channels: model input channels, 1 or 3.
        invert_bright: invert images with a bright background (brightfield, H&E) so every
            modality shows bright objects on dark (see :func:`cellrcnn.io.prepare_image`); the
            model records it when fitting starts, so inference prepares images the same way.
        hematoxylin: colour-stained tissue (H&E, IHC) becomes its hematoxylin density, nuclei
            bright, rather than inverted mean grey (see :func:`cellrcnn.io.prepare_image`);
            recorded by the model like ``invert_bright``.
        crop_size: training crop in pixels (None: full images); smaller images are zero-padded.
        batch_size: training batch size; ``eval_batch_size`` for val/test (default the same).
        num_workers: DataLoader workers (0 loads in the main process).
        augment: False disables every training transform (crop included).
        seed: fixes shuffling and augmentation.
        min_area: cropped instances under this many pixels are dropped.
        invert_p: probability of intensity inversion (dark-on-bright <-> bright-on-dark).
        scale_range: e.g. (0.75, 1.33) for random rescaling; None disables it.
        acquisition_p: share of training samples blurred and/or given photon shot noise, as
            another microscope or a dim exposure records them (0 disables it).
        balance: None (every training image once per epoch) or ``"appearance"`` (images drawn with
            replacement, rare acquisition groups more often; see the module docstring).
        synthetic: when not None, ``prepare_data`` generates the synthetic dataset at ``root``
            with these keyword arguments (``{}`` for the defaults) unless it is already there.
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str | None = "train",
        val_split: str | None = "val",
        test_split: str | None = "test",
        channels: int = 3,
        crop_size: int | None = 256,
        batch_size: int = 4,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
        eval_batch_size: int | None = None,
        min_area: int = 10,
        invert_p: float = 0.0,
        scale_range: tuple[float, float] | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        synthetic: dict | None = None,
        balance: str | None = None,
        invert_bright: bool = False,
        hematoxylin: bool = False,
        acquisition_p: float = 0.0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.channels, self.crop_size, self.batch_size = channels, crop_size, batch_size
        self.invert_bright, self.hematoxylin = bool(invert_bright), bool(hematoxylin)
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.augment, self.seed = num_workers, augment, seed
        self.min_area, self.invert_p = min_area, invert_p
        if not 0.0 <= acquisition_p <= 1.0:
            raise ValueError(f"acquisition_p is a probability in [0, 1], got {acquisition_p}")
        self.acquisition_p = float(acquisition_p)
        self.scale_range = tuple(scale_range) if scale_range is not None else None
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers and num_workers > 0
        self.synthetic = dict(synthetic) if synthetic is not None else None
        if balance not in (None, "appearance"):
            raise ValueError(f"balance must be null or 'appearance', got {balance!r}")
        self.balance = balance
        self._sample_weights: np.ndarray | None = None
        self.datasets: dict[str, Dataset] = {}
        self._generators: dict[str, torch.Generator] = {}

    def annotation_file(self, split: str) -> Path:
        """``<root>/annotations/<split>.json``, or ``split`` itself when it is a path to a JSON file."""
        name = self.splits[split]
        if name is None:
            raise ValueError(f"no {split} split configured")
        candidate = Path(name)
        if candidate.suffix == ".json":
            return candidate if candidate.is_absolute() else self.root / candidate
        return self.root / "annotations" / f"{name}.json"

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from cellrcnn.data.synthetic import ensure_dataset

            ensure_dataset(self.root, **self.synthetic)

    def _rank_seed(self) -> int:
        """``seed`` mixed with the global rank, so DDP ranks do not repeat each other's augmentations."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return self.seed + 1_000_003 * rank

    def _dataset(self, split: str) -> CocoInstanceDataset:
        return CocoInstanceDataset(
            self.annotation_file(split), image_root=self.root / "images", channels=self.channels,
            invert_bright=self.invert_bright, hematoxylin=self.hematoxylin,
        )

    def train_transform_options(self) -> dict:
        """Keyword arguments of :func:`build_train_transforms` for the training split."""
        on = self.augment
        return dict(crop_size=self.crop_size if on else None, min_area=self.min_area, flips=on, rot90=on,
                    intensity=on, invert_p=self.invert_p if on else 0.0, scale_range=self.scale_range if on else None,
                    acquisition_p=self.acquisition_p if on else 0.0)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            if self.splits[split] is None or split in self.datasets:
                continue
            base = self._dataset(split)
            if split == "train":
                transforms = build_train_transforms(**self.train_transform_options())
                self.datasets[split] = AugmentedDataset(base, transforms, self._rank_seed())
            else:
                self.datasets[split] = base

    def _generator(self, split: str) -> torch.Generator:
        # one generator per split for the module's life: a re-created loader continues the
        # stream (new shuffles and worker seeds) instead of replaying the first epoch
        if split not in self._generators:
            self._generators[split] = torch.Generator().manual_seed(self._rank_seed())
            pending = getattr(self, "_pending_generator_states", {}).pop(split, None)
            if pending is not None:  # restored from a checkpoint before the loader existed
                self._generators[split].set_state(pending)
        return self._generators[split]

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _augmenters(self) -> list:
        """The training datasets that draw augmentation seeds (AugmentedDataset parts), in order."""
        found, stack = [], [self.datasets.get("train")]
        while stack:
            ds = stack.pop(0)
            if isinstance(ds, list | tuple):
                stack[:0] = list(ds)
            elif hasattr(ds, "_main_rng"):
                found.append(ds)
            elif hasattr(ds, "datasets"):  # ConcatDataset of sources
                stack[:0] = list(ds.datasets)
        return found

    def state_dict(self) -> dict:
        """Saved in every checkpoint by Lightning: the shuffling/sampling generators, the
        augmentation generators and the process RNGs (torch, numpy, random) that training draws
        from, so ``ckpt_path=.../last.ckpt`` continues the data stream of an uninterrupted run
        instead of replaying epoch 0's order (exact in one process; under DDP only rank 0's
        state is saved, so other ranks keep their own seeds)."""
        return {
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "augmentation": [ds._main_rng.get_state() for ds in self._augmenters()],
            "torch": torch.get_rng_state(),
            "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],  # plain types
            "random": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (called by Lightning when fitting resumes from a checkpoint)."""
        if not state_dict or (self.trainer is not None and self.trainer.world_size > 1):
            return  # DDP: rank 0's states would make every rank draw the same augmentations
        pending = dict(state_dict.get("generators", {}))
        for split, state in list(pending.items()):
            if split in self._generators:
                self._generators[split].set_state(state)
                del pending[split]
        self._pending_generator_states = pending
        augmenters = self._augmenters()
        if len(augmenters) == len(state_dict.get("augmentation", [])):
            for ds, state in zip(augmenters, state_dict["augmentation"], strict=True):
                ds._main_rng.set_state(state)
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
            name, keys, *rest = state_dict["numpy"]
            np.random.set_state((name, np.asarray(keys, np.uint32), *rest))
            random.setstate(state_dict["random"])

    @property
    def weighted_sampling(self) -> bool:
        """Training images are drawn with replacement by :meth:`sample_weights`."""
        return self.balance == "appearance"

    @property
    def source_names(self) -> list[str]:
        """Names of the data sources (one here; several in :class:`cellrcnn.data.mixed.MixedDataModule`)."""
        return [self.root.name]

    def eval_sets(self, split: str) -> list[tuple[str, CocoInstanceDataset, np.ndarray]]:
        """Per source: (name, full-size dataset of ``split``, the resize factor of each of its
        images in training and validation)."""
        dataset = self._dataset(split)
        return [(self.root.name, dataset, np.ones(len(dataset)))]

    def calibration_samples(self, limit: int | None) -> list:
        """Up to ``limit`` full-size validation samples ``(image, target)``, spread evenly over the
        images of every source and prepared as validation sees them; [] without validation images."""
        if self.splits["val"] is None:
            return []
        if "val" not in self.datasets:
            self.setup("validate")
        views = self.datasets.get("val", [])
        views = views if isinstance(views, list) else [views]
        total = sum(len(v) for v in views)
        if total == 0:
            return []
        samples = []
        for view in views:
            k = len(view) if limit is None or limit >= total else max(1, round(limit * len(view) / total))
            picks = np.unique(np.linspace(0, len(view) - 1, min(k, len(view))).round().astype(int)) if len(view) else []
            samples += [view[int(i)] for i in picks]
        return samples

    def training_image_digests(self) -> list[str]:
        """Content digests of every training image (:func:`cellrcnn.data.splits.file_digest`), sorted."""
        from cellrcnn.data.splits import file_digest

        sets = self.eval_sets("train")
        return sorted({file_digest(ds.image_path(i)) for _, ds, _ in sets for i in range(len(ds))})

    def sample_weights(self) -> np.ndarray:
        """Per-image training sampling weights of ``balance="appearance"`` (reads every training
        image once; computed on first use)."""
        if self._sample_weights is None:
            from tqdm.auto import tqdm

            base = self._dataset("train")
            keys = [
                appearance_key(base.load_raw(i))
                for i in tqdm(range(len(base)), desc="grouping images", leave=False)
            ]
            self._sample_weights = balanced_weights(keys)
        return self._sample_weights

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        sampler = None
        if train and self.weighted_sampling:
            # with replacement, one epoch = as many draws as images; under DDP Lightning wraps this
            # sampler so the ranks split every epoch's draws
            weights = torch.as_tensor(self.sample_weights())
            sampler = EpochWeightedRandomSampler(
                weights, len(weights), replacement=True, generator=self._generator(split)
            )
        elif train:
            sampler = EpochRandomSampler(self.datasets[split], generator=self._generator(split))
        if sampler is not None:  # epoch e's order and augmentations depend on (seed, rank, e) only: exact resume
            sampler.seed_epochs(self._rank_seed(), self._augmenters(), self._current_epoch)
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            worker_init_fn=seed_worker,
            generator=self._generator(split),
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", train=False) if self.splits["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
