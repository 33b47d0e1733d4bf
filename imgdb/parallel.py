"""Overlapping per-item work with the main thread, in order and with bounded memory."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None,
                ahead: int = 32) -> Iterator[R]:
    """``map(fn, items)`` run in worker threads, at most ``ahead`` items in flight.

    Results come back in input order, so ids follow the order images were given. Decoding
    (Pillow, OpenCV) releases the GIL, so threads give real parallelism here without the pickling
    cost of processes. On interruption, queued work is cancelled instead of being run to the end.
    """
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2, thread_name_prefix="imgdb-decode")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
