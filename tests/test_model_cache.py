"""The app's shared model cache: bounded by bytes, shared between sessions, built once."""
from __future__ import annotations

import threading
import time

import pytest

from engine.models.factory import create_model
from ui.model_cache import SizedLRU, handle_bytes


def test_real_models_are_weighed_and_the_oldest_goes_first():
    resnet = create_model("timm:test_resnet", weights="none", num_classes=3)
    size = handle_bytes(resnet)
    params = sum(p.numel() for p in resnet.module.parameters())
    assert 4 * params < size < 4.1 * params  # float32 weights, plus BatchNorm's running statistics
    cache = SizedLRU(max_bytes=int(2.5 * size))  # room for two of these
    build = {name: (lambda n=name: create_model("timm:test_resnet", weights="none", num_classes=3))
             for name in "abc"}
    first = cache.get("a", build["a"])
    assert cache.get("a", build["a"]) is first  # a second session gets the same object
    cache.get("b", build["b"])
    cache.get("a", build["a"])  # a is now the most recently used
    cache.get("c", build["c"])  # the third model passes the bound: the least recently used (b) goes
    assert cache.keys() == ["a", "c"] and cache.total_bytes <= cache.max_bytes


def test_a_model_above_the_bound_is_still_served_alone():
    cache = SizedLRU(max_bytes=10, size_of=len)
    cache.get("small", lambda: "abc")
    assert cache.get("big", lambda: "x" * 50) == "x" * 50
    assert cache.keys() == ["big"]


def test_concurrent_sessions_build_a_model_once_and_a_failed_build_caches_nothing():
    cache = SizedLRU(max_bytes=10**9, size_of=lambda v: 1)
    builds, results = [], []

    def slow_build():
        builds.append(1)
        time.sleep(0.2)
        return object()

    threads = [threading.Thread(target=lambda: results.append(cache.get("m", slow_build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({id(r) for r in results}) == 1

    def broken():
        raise RuntimeError("no weights")

    with pytest.raises(RuntimeError):
        cache.get("bad", broken)
    assert "bad" not in cache and cache.get("bad", lambda: "fixed") == "fixed"
