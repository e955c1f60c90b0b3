"""A small thread-safe cache with a time to live and a size bound, for the collaborative checks' answers.

A message sent to many recipients, or the same spam resent in a burst, asks Pyzor (or Razor, or
DCC) once: the answer is kept for `ttl` seconds. At `max_entries` the oldest entry goes first, so
memory is bounded whatever the traffic.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class TtlCache(Generic[V]):
    """key -> value for `ttl` seconds; at most `max_entries`, the oldest dropped first."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic):
        if ttl < 0 or max_entries < 1:
            raise ValueError("ttl must be >= 0 and max_entries >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()  # key -> (expiry, value), oldest first
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        """The value stored for key, or None when there is none or it has expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            return entry[1]

    def put(self, key: Hashable, value: V) -> None:
        now = self._clock()
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (now + self.ttl, value)
            # Entries are kept in insertion order and share one ttl, so the expired ones are at the front.
            while self._entries:
                oldest_expiry = next(iter(self._entries.values()))[0]
                if oldest_expiry > now and len(self._entries) <= self.max_entries:
                    break
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
