"""Running inference off the event loop with a bounded queue, and the models the service offers.

The event loop only parses requests and sends answers; segmentation runs in a thread pool of
``workers`` threads. At most ``workers + max_queue`` jobs are admitted at a time: a request
beyond that is answered at once with 503 and ``Retry-After`` instead of waiting in memory with
its upload, so a burst from many users degrades into polite refusals, not an out-of-memory kill.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every worker is busy and the queue is full; the client should retry later."""


class InferencePool:
    """A thread pool that admits at most ``workers + max_queue`` requests at once.

    A request holds its slot from the first byte of its upload to its answer (:meth:`slot`), so at
    most ``capacity`` uploads are in memory however many clients connect. Admission is counted
    on the event loop thread (the only one that takes slots), so the counter needs no lock.
    """

    def __init__(self, workers: int = 1, max_queue: int = 8):
        if workers < 1 or max_queue < 0:
            raise ValueError(f"workers must be >= 1 and max_queue >= 0, got {workers} and {max_queue}")
        self.workers, self.max_queue = int(workers), int(max_queue)
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cellrcnn-infer")
        self.admitted = 0  # uploading, running or waiting for a worker
        self.completed = 0

    @property
    def capacity(self) -> int:
        return self.workers + self.max_queue

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the ``capacity`` places; raise :class:`QueueFull` when none is free."""
        if self.admitted >= self.capacity:
            raise QueueFull(f"{self.admitted} images are being segmented or waiting (capacity {self.capacity})")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1
            self.completed += 1

    async def execute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread (call it while holding a :meth:`slot`)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Take a slot and run ``fn(*args)`` in a worker thread; :class:`QueueFull` when over capacity."""
        with self.slot():
            return await self.execute(fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


AUTO = "auto"  # a shipped model chosen per image (cellrcnn.api.AutoSegmenter)


class ModelRegistry:
    """The models a client may name: ``auto``, the shipped ones, and a checkpoint the server was
    started with.

    Clients choose by name only, never by path. Each model is loaded once and shared by all
    worker threads (prediction does not modify it); ``auto`` and the shipped names share the
    same loaded models.
    """

    def __init__(self, default: str, weights_dir: str | Path | None = None, **segmenter_kwargs):
        from cellrcnn.api import available_models

        self.weights_dir = weights_dir
        self.shipped: dict[str, Path] = dict(available_models(weights_dir))
        self.checkpoints: dict[str, Path] = dict(self.shipped)  # name -> checkpoint, auto aside
        path = Path(default)
        if default in self.checkpoints or (default == AUTO and self.shipped):
            self.default = default
        elif path.suffix == ".ckpt" or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such checkpoint")
            self.default = path.name
            self.checkpoints = {path.name: path, **self.checkpoints}
        else:
            raise ValueError(f"unknown model {default!r}; available: {', '.join(self.names) or 'none'}, "
                             "or the path of a .ckpt file")
        self.segmenter_kwargs = segmenter_kwargs
        self._auto = None
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return ([AUTO] if self.shipped else []) + list(self.checkpoints)

    def _auto_segmenter(self):
        from cellrcnn.api import AutoSegmenter

        with self._lock:
            if self._auto is None:
                self._auto = AutoSegmenter(self.weights_dir, **self.segmenter_kwargs)
            return self._auto

    def get(self, name: str | None = None):
        """The segmenter of ``name`` (default model when None): an :class:`cellrcnn.api.AutoSegmenter`
        for ``auto``, else a :class:`cellrcnn.api.Segmenter`, loaded once."""
        from cellrcnn.api import Segmenter

        name = name or self.default
        if name == AUTO and self.shipped:
            return self._auto_segmenter()
        if name in self.shipped:  # the loader auto uses, so each shipped model is loaded once
            return self._auto_segmenter().segmenter(name)
        if name not in self.checkpoints:
            raise KeyError(name)
        with self._lock:  # two first requests for one model must not load it twice
            if name not in self._loaded:
                self._loaded[name] = Segmenter.from_checkpoint(self.checkpoints[name], name=name,
                                                               **self.segmenter_kwargs)
            return self._loaded[name]

    def warm(self) -> None:
        """Load the default model now (for ``auto``: every shipped model), not on a first request."""
        for name in (self.shipped if self.default == AUTO else [self.default]):
            self.get(name)

    def is_loaded(self, name: str) -> bool:
        if name == AUTO or name in self.shipped:
            return self._auto is not None and (name == AUTO or name in self._auto._loaded)
        return name in self._loaded

    def cards(self) -> list[dict]:
        """One entry per model: name, whether it is the default, whether it is loaded, and its
        model card (the ``.json`` beside the checkpoint: training data, thresholds, held-out metrics)."""
        out = []
        if self.shipped:
            out.append({"name": AUTO, "default": self.default == AUTO, "loaded": self.is_loaded(AUTO), "card": {
                "description": "the shipped model that suits each image: colour-stained (H&E-like) images to "
                               f"nuclei_he when installed, the rest to nuclei; shipped: {', '.join(self.shipped)}"}})
        for name, path in self.checkpoints.items():
            card = path.with_suffix(".json")
            out.append({"name": name, "default": name == self.default, "loaded": self.is_loaded(name),
                        "card": json.loads(card.read_text()) if card.is_file() else {}})
        return out


class ResultCache:
    """The label images of recent requests, so that downloading a result just shown (the page
    sends the image again for each format) does not segment it again.

    Keyed by (SHA-256 of the uploaded bytes, model, diameter, channel); holds labels, scores and
    the resize info only (the image is decoded again from the upload). Bounded by the total
    number of label pixels, least recently used first out; ``max_megapixels=0`` disables it.
    Kept in memory only, never on disk, and lost when the server stops.
    """

    def __init__(self, max_megapixels: float = 32.0):
        self.max_pixels = float(max_megapixels) * 1e6
        self._items: OrderedDict = OrderedDict()
        self._pixels = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple, labels, scores, info: dict) -> None:
        if labels.size > self.max_pixels:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (labels, scores, dict(info))
            self._pixels += labels.size
            while self._pixels > self.max_pixels:
                _, (old, _, _) = self._items.popitem(last=False)
                self._pixels -= old.size

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "megapixels": round(self._pixels / 1e6, 3), "hits": self.hits,
                    "misses": self.misses}
