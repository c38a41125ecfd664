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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every worker is busy and the queue is full; the client should retry later."""


class InferencePool:
    """A thread pool that admits at most ``workers + max_queue`` jobs at once.

    Admission is counted on the event loop thread (the only one that calls :meth:`run`), so the
    counter needs no lock.
    """

    def __init__(self, workers: int = 1, max_queue: int = 8):
        if workers < 1 or max_queue < 0:
            raise ValueError(f"workers must be >= 1 and max_queue >= 0, got {workers} and {max_queue}")
        self.workers, self.max_queue = int(workers), int(max_queue)
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cellrcnn-infer")
        self.admitted = 0  # running + waiting
        self.completed = 0

    @property
    def capacity(self) -> int:
        return self.workers + self.max_queue

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the pool; raise :class:`QueueFull` when over capacity."""
        if self.admitted >= self.capacity:
            raise QueueFull(f"{self.admitted} images are being segmented or waiting (capacity {self.capacity})")
        self.admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.admitted -= 1
            self.completed += 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class ModelRegistry:
    """The models a client may name: the shipped ones plus the one the server was started with.

    Clients choose by name only, never by path. Each model is loaded once, on first use (the
    default one at start-up), and shared by all worker threads (prediction does not modify it).
    """

    def __init__(self, default: str, weights_dir: str | Path | None = None, **segmenter_kwargs):
        from cellrcnn.api import available_models

        self.checkpoints: dict[str, Path] = dict(available_models(weights_dir))
        path = Path(default)
        if default in self.checkpoints:
            self.default = default
        elif path.suffix == ".ckpt" or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such checkpoint")
            self.default = path.name
            self.checkpoints = {path.name: path, **self.checkpoints}
        else:
            raise ValueError(f"unknown model {default!r}; available: {', '.join(self.checkpoints) or 'none'}, "
                             "or the path of a .ckpt file")
        self.segmenter_kwargs = segmenter_kwargs
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.checkpoints)

    def get(self, name: str | None = None):
        """The :class:`cellrcnn.api.Segmenter` of ``name`` (default model when None), loaded once."""
        from cellrcnn.api import Segmenter

        name = name or self.default
        if name not in self.checkpoints:
            raise KeyError(name)
        with self._lock:  # two first requests for one model must not load it twice
            if name not in self._loaded:
                self._loaded[name] = Segmenter.from_checkpoint(self.checkpoints[name], name=name,
                                                               **self.segmenter_kwargs)
            return self._loaded[name]

    def cards(self) -> list[dict]:
        """One entry per model: name, whether it is the default, whether it is loaded, and its
        model card (the ``.json`` beside the checkpoint: training data, thresholds, held-out metrics)."""
        out = []
        for name, path in self.checkpoints.items():
            card = path.with_suffix(".json")
            out.append({"name": name, "default": name == self.default, "loaded": name in self._loaded,
                        "card": json.loads(card.read_text()) if card.is_file() else {}})
        return out
