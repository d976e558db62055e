"""Interrupt coalescing (NVMe 1.4 features Interrupt Coalescing, 08h, and Interrupt Vector
Configuration, 09h).

Feature 08h holds the aggregation threshold THR (bits 7:0, the number of completion entries
per vector minus one) and the aggregation time TIME (bits 15:8, in 100 µs units). A vector
whose coalescing applies raises its interrupt once THR + 1 entries were posted to its
completion queues, or TIME after the first of them, whichever comes first. TIME 0 means no
delay: coalescing is then off, as it is with THR 0 (one entry). Feature 09h's Coalescing
Disable bit turns it off for one vector; the admin queue's vector 0 is never coalesced.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio

#: TIME's unit, in seconds.
TIME_UNIT = 100e-6


def threshold_and_time(setting: int) -> tuple[int, float]:
    """(entries per interrupt, longest delay in seconds) of feature 08h's value."""
    return (setting & 0xFF) + 1, ((setting >> 8) & 0xFF) * TIME_UNIT


class Coalescing:
    """Counts completions per vector and decides when each raises its interrupt."""

    def __init__(
        self,
        raise_vector: Callable[[int], None],
        spawn: Callable[[Callable[[], Awaitable[object]]], None],
    ) -> None:
        self._raise = raise_vector
        self._spawn = spawn
        self._counts: dict[int, int] = {}
        self._timers: dict[int, trio.CancelScope] = {}

    def reset(self) -> None:
        """Forget what was counted (a controller reset): nothing is raised for it."""
        for scope in self._timers.values():
            scope.cancel()
        self._counts.clear()
        self._timers.clear()

    def flush(self) -> None:
        """Raise every interrupt being held back now."""
        for vector in list(self._counts):
            self._fire(vector)

    def posted(self, vector: int, entries: int, setting: int, applies: bool) -> None:
        """``entries`` were posted for ``vector``; ``setting`` is feature 08h's value and
        ``applies`` whether coalescing is enabled for the vector (feature 09h)."""
        threshold, delay = threshold_and_time(setting)
        if not applies or threshold == 1 or delay == 0:
            self._fire(vector)
            return
        count = self._counts.get(vector, 0) + entries
        if count >= threshold:
            self._fire(vector)
            return
        self._counts[vector] = count
        if vector not in self._timers:
            scope = trio.CancelScope()
            self._timers[vector] = scope
            self._spawn(partial(self._expire, vector, scope, delay))

    def _fire(self, vector: int) -> None:
        self._counts.pop(vector, None)
        scope = self._timers.pop(vector, None)
        if scope is not None:
            scope.cancel()
        self._raise(vector)

    async def _expire(self, vector: int, scope: trio.CancelScope, delay: float) -> None:
        with scope:
            await trio.sleep(delay)
            if self._timers.get(vector) is scope:
                self._fire(vector)
