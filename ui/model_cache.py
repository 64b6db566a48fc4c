"""The models every session shares, bounded by their size in memory, least recently used first out.

Why not ``st.cache_resource(max_entries=N)`` alone: it bounds how many models stay, not how much
memory they take; six ViT-Large would be 7 GB on a 2.7 GB server. Here the total size of the kept
models stays within ``max_bytes`` (WORKBENCH_MODEL_CACHE_MB, default 400 MB). A second session asking
for a model gets the same object (no second copy, and no second load while the first is loading);
a model that would pass the bound evicts the least recently used ones. The newest model is always
kept, even alone above the bound: the page asking for it needs it.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

DEFAULT_MAX_BYTES = 400 * 2**20


def model_cache_bytes() -> int:
    try:
        return max(1, int(float(os.environ.get("WORKBENCH_MODEL_CACHE_MB", "")) * 2**20))
    except ValueError:
        return DEFAULT_MAX_BYTES


def handle_bytes(handle: Any) -> int:
    """Parameters and buffers of a model handle (or a module), in bytes."""
    module = getattr(handle, "module", handle)
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class SizedLRU:
    """A thread-safe LRU whose entries are weighed by ``size_of``; total weight <= ``max_bytes``."""

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int] = handle_bytes):
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def keys(self) -> list[Hashable]:
        """Oldest first."""
        with self._lock:
            return list(self._items)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._items.values())

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The cached value for ``key``, built once (other callers wait for that build) if absent."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            gate = self._building.setdefault(key, threading.Lock())
        with gate:  # one build per key; a caller arriving during it waits, then finds it cached
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key][0]
            value = build()  # an error leaves nothing cached: the next call tries again
            size = self._size_of(value)
            with self._lock:
                self._items[key] = (value, size)
                total = sum(s for _, s in self._items.values())
                while total > self.max_bytes and len(self._items) > 1:
                    _old, (_, old_size) = self._items.popitem(last=False)
                    total -= old_size
                self._building.pop(key, None)
            return value
