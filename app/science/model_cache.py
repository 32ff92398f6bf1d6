"""A per-process cache of loaded networks, bounded by bytes, least recently used out first.

Keyed by (weights sha256, device): the same file on another device is another entry, and a file
whose content changed has another sha256, so a stale network is never served. A plate of 96
fields x 4 channels loads each channel's weights once instead of once per field.

>>> cache = ModelCache(max_bytes=100)
>>> cache.get_or_load("aa", "cpu", lambda: "net-a", size_of=lambda _: 60)
'net-a'
>>> cache.get_or_load("aa", "cpu", lambda: "reloaded", size_of=lambda _: 60)  # a hit: no reload
'net-a'
>>> _ = cache.get_or_load("bb", "cpu", lambda: "net-b", size_of=lambda _: 60)  # evicts "aa"
>>> cache.keys(), cache.stats()["evictions"]
([('bb', 'cpu')], 1)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

#: Default budget: ~40 full-width CPnets (26 MB each) or ~150 half-width ones.
DEFAULT_MAX_BYTES = 1 << 30


def _size_of_module(net: Any) -> int:
    from app.science.device import module_nbytes

    return module_nbytes(net)


class ModelCache:
    """LRU map (sha256, device) -> loaded object, holding at most ``max_bytes`` (thread-safe).

    An entry larger than the whole budget is returned but not kept. Loading happens outside the
    lock, so two threads asking for the same new key may both load it; the first one stored wins.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0

    @staticmethod
    def key(sha256: str, device: Any) -> tuple[str, str]:
        return (str(sha256).lower(), str(device))

    def get(self, sha256: str, device: Any) -> Any | None:
        key = self.key(sha256, device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def get_or_load(
        self,
        sha256: str,
        device: Any,
        load: Callable[[], Any],
        *,
        size_of: Callable[[Any], int] = _size_of_module,
    ) -> Any:
        """The cached object for (sha256, device), or ``load()``'s result, cached."""
        key = self.key(sha256, device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry[0]
            self._misses += 1
        value = load()
        size = int(size_of(value))
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None:  # another thread loaded it meanwhile: one copy only
                self._entries.move_to_end(key)
                return existing[0]
            if size > self.max_bytes:
                return value
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
                self._evictions += 1
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def keys(self) -> list[tuple[str, str]]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
            }

    def __len__(self) -> int:
        return len(self._entries)
