"""Shared pieces of the test hooks: message direction, and chaining several hooks into one.

A chain is layered like a network stack: the hooks are listed from the application outwards
to the socket. An outgoing frame passes them first to last, an incoming one last to first, so
``chain(faults, tracer)`` puts the tracer next to the socket: it records what really crossed
the wire (a dropped send never appears, a delayed one appears when it is finally sent).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import overload

from ..engine import Connection, ConnectionHooks, Forward, FramingError, Link
from ..ordering import Processing
from ..protocol.framing import Frame

__all__ = ["Direction", "HookChain", "chain", "close_hooks"]


class Direction(enum.Enum):
    """Which way a message went, seen from the side the hook is installed on."""

    SENT = "sent"
    RECEIVED = "received"

    @property
    def arrow(self) -> str:
        return "→" if self is Direction.SENT else "←"


#: One hook method, bound: ``(conn, link, frame, forward)``.
_Stage = Callable[[Connection, Link, Frame, Forward], None]


class HookChain(ConnectionHooks):
    """Several hooks acting as one; build it with :func:`chain`."""

    def __init__(self, *hooks: ConnectionHooks) -> None:
        self.hooks = hooks

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        _run([h.on_send for h in self.hooks], conn, link, frame, forward)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        _run([h.on_receive for h in reversed(self.hooks)], conn, link, frame, forward)

    def on_framing_error(self, conn: Connection, link: Link, event: FramingError) -> None:
        for hook in self.hooks:
            hook.on_framing_error(conn, link, event)

    def on_processing(self, conn: Connection, link: Link, frame: Frame, phase: Processing) -> None:
        """Tell every member that observes processing (a :class:`~.tracer.Tracer`)."""
        for hook in self.hooks:
            observe = getattr(hook, "on_processing", None)
            if observe is not None:
                observe(conn, link, frame, phase)

    def close(self) -> None:
        """Close every member that holds frames (see :func:`close_hooks`)."""
        for hook in self.hooks:
            close_hooks(hook)


def _run(stages: list[_Stage], conn: Connection, link: Link, frame: Frame, last: Forward) -> None:
    def forward_from(index: int) -> Forward:
        if index == len(stages):
            return last
        stage = stages[index]
        return lambda f: stage(conn, link, f, forward_from(index + 1))

    forward_from(0)(frame)


@overload
def chain(first: ConnectionHooks, /, *rest: ConnectionHooks | None) -> ConnectionHooks: ...


@overload
def chain(*hooks: ConnectionHooks | None) -> ConnectionHooks | None: ...


def chain(*hooks: ConnectionHooks | None) -> ConnectionHooks | None:
    """Combine hooks (listed from the application outwards); ``None`` entries are skipped.

    Returns None when nothing is left (so the engine runs without hooks), the hook itself when
    one is left, else a :class:`HookChain`.
    """
    present = tuple(h for h in hooks if h is not None)
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return HookChain(*present)


def close_hooks(hooks: ConnectionHooks | None) -> None:
    """Release frames a hook still holds (delayed or reordered ones): close their fds.

    Hooks that hold frames have a ``close()`` method; others are left alone.
    """
    close = getattr(hooks, "close", None)
    if callable(close):
        close()
