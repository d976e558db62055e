"""The Keep Alive Timer (NVMe 1.4: the Keep Alive Timer feature, 0Fh, and "Keep Alive").

The host sets KATO (Set Features 0Fh, in milliseconds; 0 turns the timer off) and then sends
Keep Alive commands (admin opcode 18h) more often than that. The controller counts in units of
its Keep Alive Support granularity (KAS in Identify Controller, 100 ms units: `KAS`): the
timeout is KATO rounded up to it. If no Keep Alive arrives in time the timer expires and the
controller stops processing commands with Controller Fatal Status (CSTS.CFS) set, which the
host clears with a controller reset. The timer is idle while the controller is stopped for a
migration and starts afresh when it runs again. Linux's PCIe driver never sets KATO.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

#: KAS: the timer's granularity, in 100 ms units (Identify Controller bytes 321:320).
KAS = 1
GRANULARITY = KAS * 0.1


class KeepAlive:
    """One controller's Keep Alive Timer; ``expired`` is called (once) when it runs out."""

    def __init__(
        self,
        expired: Callable[[], None],
        spawn: Callable[[Callable[[], Awaitable[object]]], None],
    ) -> None:
        self._expired = expired
        self._spawn = spawn
        self._scope = trio.CancelScope()
        self.timeout = 0.0  # seconds; 0: off
        self.deadline = math.inf

    def start(self, kato_ms: int) -> None:
        """(Re)start with KATO ``kato_ms`` (0: stop)."""
        self.stop()
        if kato_ms:
            self.timeout = math.ceil(kato_ms / 1000 / GRANULARITY - 1e-9) * GRANULARITY
            self.kick()
            self._scope = trio.CancelScope()
            self._spawn(self._watch)

    def kick(self) -> None:
        """A Keep Alive command: the timer starts over."""
        if self.timeout:
            self.deadline = trio.current_time() + self.timeout

    def stop(self) -> None:
        self._scope.cancel()
        self.timeout, self.deadline = 0.0, math.inf

    async def _watch(self) -> None:
        with self._scope:
            while trio.current_time() < self.deadline:
                await trio.sleep_until(self.deadline)
            self.timeout, self.deadline = 0.0, math.inf
            self._expired()
