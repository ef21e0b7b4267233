"""Run independent per-tensor work on every core: file reads and writes, hashing and numpy's array
loops all release the GIL, so plain threads are enough and nothing is copied between processes."""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 8


def workers() -> int:
    """Threads to use: PATCHKIT_THREADS if set, else the cores this process may run on (at most 8)."""
    env = os.environ.get("PATCHKIT_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def map_ordered(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """[fn(x) for x in items], spread over threads. Results come in the order of `items`; if calls
    fail, the exception of the first failing item (in that order) is raised, after all have ended."""
    items = list(items)
    n = min(threads or workers(), len(items))
    if n <= 1:
        return [fn(x) for x in items]
    results: list = [None] * len(items)
    errors: list[Exception | None] = [None] * len(items)
    order = iter(range(len(items)))
    lock = threading.Lock()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            with lock:
                i = next(order, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except Exception as e:  # re-raised in the caller's thread below
                errors[i] = e

    helpers = [threading.Thread(target=run, daemon=True) for _ in range(n - 1)]
    for t in helpers:
        t.start()
    try:
        run()
    except BaseException:  # Ctrl-C, raised in this thread: the helpers take no new item
        stop.set()
        raise
    finally:
        for t in helpers:  # and finish the one they hold
            t.join()
    for e in errors:
        if e is not None:
            raise e
    return results
