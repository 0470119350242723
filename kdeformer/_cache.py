"""The project's one least-recently-used cache: bounded, so memory stays flat over thousands of calls.

Used by :mod:`kdeformer.sources` (extracted sources, loaded models) and meant for the explorer's engine
too (``widgets/state.py``). Safe to share between threads: every read and write holds the cache's lock;
``get_or`` builds a missing value outside the lock, once: a second thread asking for a key that is being
built waits for that value instead of building it again (the explorer warms neighbouring heads on a
background thread; a move to one of them takes what is already under way).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable

from ._checks import check_positive_int


class LRU:
    """At most `maxsize` entries; reading or writing an entry makes it the most recent one."""

    def __init__(self, maxsize: int):
        self.maxsize = check_positive_int("maxsize", maxsize)
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict = {}  # key -> (thread id, Event set when its value is stored or failed)

    def get(self, key: Hashable, default=None):
        """The cached value (now the most recent), or `default`."""
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value) -> None:
        """Store `value`, dropping the least recently used entries beyond `maxsize`."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def get_or(self, key: Hashable, make: Callable[[], object]):
        """The cached value, or ``make()`` stored and returned. While another thread builds the same key,
        wait for it and take its value (build it here only if that build failed or was evicted at once)."""
        me = threading.get_ident()
        while True:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    return self._data[key]
                builder, done = self._building.get(key, (None, None))
                if done is None or builder == me:  # nobody builds it (or this thread does, re-entered)
                    done = threading.Event()
                    self._building.setdefault(key, (me, done))
                    break
            done.wait()
        try:
            value = make()
            self.put(key, value)
            return value
        finally:
            with self._lock:
                if self._building.get(key, (None, None))[1] is done:
                    del self._building[key]
            done.set()

    def __getitem__(self, key: Hashable):
        """The cached value (now the most recent); KeyError when missing."""
        missing = object()
        value = self.get(key, missing)
        if value is missing:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Hashable, value) -> None:
        self.put(key, value)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
