"""A work queue in the manner of client-go's: keys, not events.

A key is queued at most once; a key being processed is never handed to a second worker;
a key added while it is processed is processed again afterwards. Failures come back after
an exponential backoff, so a broken resource never spins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 60.0
    _failures: dict[Key, int] = field(default_factory=dict)

    def next_delay(self, key: Key) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        return float(min(self.cap, self.base * 2**n))

    def forget(self, key: Key) -> None:
        self._failures.pop(key, None)


class WorkQueue:
    def __init__(self, backoff: Backoff | None = None) -> None:
        self.backoff = backoff or Backoff()
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def add(self, key: Key) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Key, delay: float) -> None:
        """Queue `key` in `delay` seconds (an earlier pending request wins)."""
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        if existing is not None and existing.when() <= loop.time() + delay:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def __len__(self) -> int:
        return len(self._queued)

    async def worker(self, process: Callable[[Key], Awaitable[float | None]]) -> None:
        """Process keys forever. `process` returns seconds until the key should be looked
        at again (or None); an exception requeues the key with backoff."""
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._processing.add(key)
            try:
                again = await process(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.add_after(key, self.backoff.next_delay(key))
            else:
                self.backoff.forget(key)
                if again is not None:
                    self.add_after(key, again)
            finally:
                self._processing.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)

    def shutdown(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
