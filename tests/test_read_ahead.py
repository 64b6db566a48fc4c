"""engine/data/ahead.py: batches read ahead in a thread keep their order, their errors and their cancel."""
from __future__ import annotations

import threading
import time

import pytest

from engine.data.ahead import read_ahead
from engine.data.images import ImageError


def test_items_arrive_in_order_and_the_producer_runs_ahead():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    seen = []
    for item in read_ahead(items(), depth=2):
        if item == 0:
            time.sleep(0.2)  # the thread fills the queue meanwhile
            assert len(produced) >= 3
        seen.append(item)
    assert seen == list(range(6))


def test_a_loading_error_is_raised_in_the_consumer_at_its_place():
    def items():
        yield 1
        raise ImageError("photo.jpg: truncated or corrupt")

    got = []
    with pytest.raises(ImageError, match="truncated or corrupt"):
        for item in read_ahead(items()):
            got.append(item)
    assert got == [1]


def test_a_consumer_that_stops_early_ends_the_thread():
    def items():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    stream = read_ahead(items(), depth=1)
    assert next(stream) == 0
    stream.close()  # what a cancelled pass does when it returns
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
