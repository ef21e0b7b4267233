"""patchkit.core.parallel: per-tensor work on several threads, results in order, first error wins."""

from __future__ import annotations

import threading
import time

import pytest

from patchkit.core.parallel import map_ordered, workers


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_results_come_in_input_order(threads):
    seen = set()

    def slow_square(x):
        seen.add(threading.get_ident())
        time.sleep(0.002 * (7 - x % 7))  # later items tend to finish first
        return x * x

    assert map_ordered(slow_square, range(20), threads) == [x * x for x in range(20)]
    if threads == 1:
        assert seen == {threading.get_ident()}  # no thread is started for one
    else:
        assert threading.get_ident() in seen and 1 < len(seen) <= threads


def test_the_first_failing_item_in_order_is_raised_after_all_have_run():
    done = []

    def f(x):
        if x in (3, 7):
            time.sleep(0.05 if x == 3 else 0)  # item 7 fails first in time, item 3 first in order
            raise ValueError(f"item {x}")
        done.append(x)
        return x

    with pytest.raises(ValueError, match="item 3"):
        map_ordered(f, range(10), 2)
    assert sorted(done) == [0, 1, 2, 4, 5, 6, 8, 9]


def test_workers_follows_the_environment(monkeypatch):
    monkeypatch.setenv("PATCHKIT_THREADS", "3")
    assert workers() == 3
    monkeypatch.setenv("PATCHKIT_THREADS", "zero")
    assert 1 <= workers() <= 8


def test_an_interrupt_in_the_calling_thread_stops_taking_new_items():
    """Ctrl-C reaches the main thread: it propagates at once, and the helpers take no new item."""
    done = []

    def f(x):
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
        time.sleep(0.01)
        done.append(x)

    with pytest.raises(KeyboardInterrupt):
        map_ordered(f, range(200), 2)
    assert len(done) < 50
