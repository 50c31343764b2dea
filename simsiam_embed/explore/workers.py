"""One way to spread per-image work over the cores: a pool of spawned worker processes."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Below this many items the pool's start-up (about a second a worker) costs more than it saves,
#: for work of tens of milliseconds an item (decoding and describing a picture).
POOL_MIN_ITEMS = 8


def map_in_workers(function: Callable[[Item], Result], items: Sequence[Item],
                   workers: int | None = None, isolated: bool = False, min_items: int = POOL_MIN_ITEMS) -> list[Result]:
    """``[function(item) for item in items]``, in up to one process a core. ``function`` must be a
    module-level function (it is pickled by name). Fewer than ``min_items`` run here, where a
    pool's start-up would cost more than it saves. ``isolated``: never in this process, even for
    a few items (``function`` changes process-wide state, such as where stderr goes)."""
    workers = workers if workers is not None else min(len(items), os.cpu_count() or 1)
    if not isolated and (workers <= 1 or len(items) < min_items):
        return [function(item) for item in items]
    if not items:
        return []
    workers = max(1, min(workers, len(items)))
    # Spawned, not forked: a fork of a process whose other threads hold locks (FAISS's OpenMP,
    # ONNX Runtime's pool, PyTorch's) left workers asleep for ever in the first measurement.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(function, items, chunksize=max(1, len(items) // (4 * workers))))
