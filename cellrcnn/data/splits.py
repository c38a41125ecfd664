"""The one split rule of the project: an image's split is decided by the SHA-256 of
``"<salt>:<key>"`` alone, where the key is the image's own identifier in its source (the DSB
ImageId, a file stem) and the salt names the source.

Converters, the training benchmark and the data module all call :func:`assign_split` or
:func:`split_by_hash`, so the images a benchmark holds out are exactly the converted ``test``
split. An image's split depends only on its key and salt: adding images never moves existing
ones, and neither does the folder depth a user unpacked a download to.

BBBC038 (DSB2018) uses the salt ``dsb2018`` with fractions 80/10/10: its ``test`` split is the
10 % the project's DSB2018 models have always been scored on (u >= 0.9 of the same hash), so
their published held-out figures stay comparable and no shipped model has seen it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# sources whose split salt is not their own name (kept for continuity of published results)
SPLIT_SALTS = {"bbbc038": "dsb2018"}


def split_salt(source: str) -> str:
    """The salt of a source's split: its name, unless :data:`SPLIT_SALTS` says otherwise."""
    return SPLIT_SALTS.get(source, source)


def hash_unit(key: Hashable, salt: str = "") -> float:
    """A uniform number in [0, 1) from the SHA-256 of ``"<salt>:<key>"`` (platform independent)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _edges(fractions: Sequence[float]) -> np.ndarray:
    total = float(sum(fractions))
    if total <= 0 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative with a positive sum, got {tuple(fractions)}")
    return np.cumsum(np.asarray(fractions, float) / total)


def _group(u: float, edges: np.ndarray) -> int:
    return min(int(np.searchsorted(edges, u, side="right")), len(edges) - 1)


def assign_split(
    key: Hashable, fractions: Sequence[float] = DEFAULT_FRACTIONS, salt: str = "", names: Sequence[str] = SPLITS
) -> str:
    """The split name of one image (``names[i]`` for the i-th fraction)."""
    if len(names) < len(fractions):
        raise ValueError(f"{len(fractions)} fractions but only {len(names)} split names")
    return names[_group(hash_unit(key, salt), _edges(fractions))]


def split_by_hash(
    ids: Sequence[Hashable], fractions: Sequence[float] = (0.9, 0.1), salt: str = ""
) -> list[list[Hashable]]:
    """Split ids into ``len(fractions)`` groups by :func:`assign_split`'s rule; groups keep input order."""
    edges = _edges(fractions)
    groups: list[list[Hashable]] = [[] for _ in fractions]
    for i in ids:
        groups[_group(hash_unit(i, salt), edges)].append(i)
    return groups


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, 16 hex digits: identifies an image whatever its name or folder."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def overlap(paths: Iterable[str | Path], digests: Iterable[str]) -> list[Path]:
    """The files among ``paths`` whose content is among ``digests`` (e.g. a checkpoint's training images)."""
    known = set(digests)
    return [Path(p) for p in paths if known and file_digest(p) in known]
