"""Fault injection: connection hooks that drop, delay, reorder, corrupt or cut messages.

Every fault selects messages the same way. The filters given must all match: ``direction``
(SENT or RECEIVED, seen from the side the hook is installed on), ``command`` (a command
number; its replies carry it too), ``reply`` (True: replies only, False: commands only) and
``where`` (any predicate on the frame). Matching messages are counted 1, 2, 3...; the fault
acts on match number ``nth``, or on every match when ``nth`` is None::

    Drop(3)                                               # the 3rd message, any kind
    Drop(1, direction=Direction.RECEIVED, command=Command.REGION_READ, reply=True)
    Delay(direction=Direction.SENT, command=Command.REGION_WRITE, until=gate)

Faults are ordinary :class:`~vfiouser_trio.engine.ConnectionHooks`: install one, or several
with a tracer through :func:`~vfiouser_trio.testing.hooks.chain`. ``fault.triggered`` is set
once the fault has acted (``fault.fired`` counts how often), so a test can wait for it instead
of sleeping. Frames a fault still holds (Delay, Reorder) are discarded, fds closed, by
``close()``, which the nested device calls on exit; Delay also discards them when the
connection closes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import TypedDict, Unpack

import trio

from ..engine import Connection, ConnectionHooks, Forward, Link
from ..protocol.framing import Frame
from ..protocol.header import Header
from .hooks import Direction

__all__ = [
    "Corrupt",
    "Delay",
    "Disconnect",
    "Drop",
    "Fault",
    "FramePredicate",
    "Mangle",
    "OrderedDelay",
    "Reorder",
    "Selection",
    "set_header",
    "set_payload",
]

log = logging.getLogger(__name__)

#: Extra selection of the messages a fault acts on.
FramePredicate = Callable[[Frame], bool]
#: Turns a frame into its corrupted form (see :func:`set_header`, :func:`set_payload`).
Mangle = Callable[[Frame], Frame]


class Selection(TypedDict, total=False):
    """The message filters every fault takes as keyword arguments (see the module doc)."""

    direction: Direction | None
    command: int | None
    reply: bool | None
    where: FramePredicate | None


class Fault(ConnectionHooks):
    """Base class: selects and counts messages; a subclass's :meth:`act` does the damage."""

    def __init__(
        self,
        nth: int | None = None,
        *,
        direction: Direction | None = None,
        command: int | None = None,
        reply: bool | None = None,
        where: FramePredicate | None = None,
    ) -> None:
        if nth is not None and nth < 1:
            raise ValueError("nth counts from 1")
        self.nth = nth
        self.direction = direction
        self.command = command
        self.reply = reply
        self.where = where
        #: Messages that matched the filters so far.
        self.matched = 0
        #: Messages the fault acted on so far.
        self.fired = 0
        #: Set when the fault first acts.
        self.triggered = trio.Event()

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self._pass(conn, link, Direction.SENT, frame, forward)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self._pass(conn, link, Direction.RECEIVED, frame, forward)

    def _pass(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        if self.selects(direction, frame):
            self.fired += 1
            self.triggered.set()
            self.act(conn, link, direction, frame, forward)
        else:
            forward(frame)

    def selects(self, direction: Direction, frame: Frame) -> bool:
        """Whether the fault acts on this message (counts it when it matches the filters)."""
        header = frame.header
        if (
            (self.direction is not None and direction is not self.direction)
            or (self.command is not None and header.command != self.command)
            or (self.reply is not None and header.is_reply != self.reply)
            or (self.where is not None and not self.where(frame))
        ):
            return False
        self.matched += 1
        return self.nth is None or self.matched == self.nth

    def act(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        """Do the fault's work on a selected frame (owning it: forward it or close its fds)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release any frames the fault still holds (their fds are closed)."""


class Drop(Fault):
    """Lose the selected messages: they never reach the socket (or the engine)."""

    def act(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        frame.close_fds()


class Disconnect(Fault):
    """Close the connection at the selected message (which is lost).

    Requests pending on this side fail with ConnectionClosedError; the peer sees the socket
    close.
    """

    def act(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        frame.close_fds()
        conn.close()


class Corrupt(Fault):
    """Pass the selected messages on mangled (by default with an unknown command number).

    ``mangle`` returns the frame to send instead; see :func:`set_header` and
    :func:`set_payload`. An outgoing header is written to the socket as it is, so a wrong
    ``msg_size`` really desynchronises the peer's stream.
    """

    def __init__(
        self, nth: int | None = None, *, mangle: Mangle | None = None, **select: Unpack[Selection]
    ) -> None:
        super().__init__(nth, **select)
        self.mangle = mangle if mangle is not None else set_header(command=UNKNOWN_COMMAND)

    def act(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        try:
            mangled = self.mangle(frame)
        except BaseException:
            frame.close_fds()
            raise
        forward(mangled)


#: A command number the protocol does not define (the default corruption).
UNKNOWN_COMMAND = 0xFFFF


def set_header(**fields: int) -> Mangle:
    """A mangle that replaces header fields: ``set_header(msg_size=8)``, ``set_header(flags=0)``."""

    def mangle(frame: Frame) -> Frame:
        return Frame(dataclasses.replace(frame.header, **fields), frame.payload, frame.take_fds())

    return mangle


def set_payload(payload: bytes | Callable[[bytes], bytes], *, fix_size: bool = True) -> Mangle:
    """A mangle that replaces the payload (bytes, or a function of the old payload).

    With ``fix_size`` the header's ``msg_size`` follows the new length, so the stream stays in
    sync and only the message's content is wrong.
    """

    def mangle(frame: Frame) -> Frame:
        new = payload(bytes(frame.payload)) if callable(payload) else payload
        header: Header = frame.header
        if fix_size:
            size = header.msg_size - len(frame.payload) + len(new)
            header = dataclasses.replace(header, msg_size=size)
        return Frame(header, new, frame.take_fds())

    return mangle


class _Held:
    """A frame a fault is holding back, with the path to send it on."""

    __slots__ = ("forward", "frame", "path", "remaining")

    def __init__(self, frame: Frame, forward: Forward, path: tuple[Direction, Link]) -> None:
        self.frame = frame
        self.forward = forward
        self.path = path
        self.remaining = 0

    def release(self) -> None:
        self.forward(self.frame)

    def discard(self) -> None:
        self.frame.close_fds()


class _HoldingFault(Fault):
    """A fault that keeps frames for a while; ``close()`` releases their fds."""

    def __init__(self, nth: int | None = None, **select: Unpack[Selection]) -> None:
        super().__init__(nth, **select)
        self._held: list[_Held] = []

    @property
    def holding(self) -> int:
        """How many frames the fault holds right now."""
        return len(self._held)

    def _let_go(self, held: _Held, *, send: bool) -> None:
        if held in self._held:
            self._held.remove(held)
            if send:
                held.release()
            else:
                held.discard()

    def close(self) -> None:
        held, self._held = self._held, []
        for entry in held:
            entry.discard()


class Delay(_HoldingFault):
    """Hold the selected messages until ``until`` is set, or for ``seconds`` (trio time).

    Each held message is released by a task of its own, so it overtakes nothing it should
    not: later messages on the same path go ahead of it (that is the point). If the
    connection closes first, the message is discarded.
    """

    def __init__(
        self,
        nth: int | None = None,
        *,
        until: trio.Event | None = None,
        seconds: float | None = None,
        **select: Unpack[Selection],
    ) -> None:
        if (until is None) == (seconds is None):
            raise ValueError("give exactly one of until and seconds")
        super().__init__(nth, **select)
        self.until = until
        self.seconds = seconds
        #: Messages released (sent on) so far.
        self.released = 0

    def act(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        held = _Held(frame, forward, (direction, link))
        self._held.append(held)
        # A hook must not block, and the engine gives it no nursery: a system task waits
        # instead. It ends when the message is released, the connection closes or trio exits.
        trio.lowlevel.spawn_system_task(self._release_later, conn, held, name="Delay")

    async def _release_later(self, conn: Connection, held: _Held) -> None:
        send = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on, conn.closed, nursery.cancel_scope)
                if self.until is not None:
                    await self.until.wait()
                else:
                    assert self.seconds is not None
                    await trio.sleep(self.seconds)
                send = not conn.closed.is_set()
                nursery.cancel_scope.cancel()
        except Exception:  # a system task must not raise: it would crash the trio run
            log.exception("Delay failed")
        finally:
            if send:
                self.released += 1
            self._let_go(held, send=send)


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class Reorder(_HoldingFault):
    """Hold the selected message and send it right after the next ``after`` messages that take
    the same path (same direction and link): ``Reorder(2, direction=Direction.SENT)`` swaps the
    2nd and 3rd messages sent."""

    def __init__(
        self, nth: int | None = None, *, after: int = 1, **select: Unpack[Selection]
    ) -> None:
        if after < 1:
            raise ValueError("after must be at least 1")
        super().__init__(nth, **select)
        self.after = after

    def _pass(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        path = (direction, link)
        waiting = [h for h in self._held if h.path == path]
        for held in waiting:
            held.remaining -= 1
        super()._pass(conn, link, direction, frame, forward)
        for held in waiting:
            if held.remaining <= 0:
                self._let_go(held, send=True)

    def act(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        held = _Held(frame, forward, (direction, link))
        held.remaining = self.after
        self._held.append(held)


#: Seconds to hold one selected message (0: none), given the frame and its match number.
DelayFunction = Callable[[Frame, int], float]


class _Queued:
    __slots__ = ("frame", "ready")

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.ready = False


class OrderedDelay(_HoldingFault):
    """Delay selected messages (trio time) without reordering any sender's messages.

    Unlike :class:`Delay` a held message also holds back every later message on the same
    path (direction and link), selected or not, as a slow network would: a real peer writes
    one stream in order. ``seconds`` is a number, a mapping from match number (1, 2, ...) to
    seconds (unlisted matches: no delay), or a function of the frame and its match number::

        OrderedDelay(seconds={3: 0.002}, direction=Direction.SENT)  # the 3rd message, 2 ms

    A message waits until its own time has passed and every message ahead of it has gone.
    If the connection closes first, held messages are discarded.
    """

    def __init__(
        self,
        nth: int | None = None,
        *,
        seconds: float | Mapping[int, float] | DelayFunction,
        **select: Unpack[Selection],
    ) -> None:
        super().__init__(nth, **select)
        if callable(seconds):
            self._seconds: DelayFunction = seconds
        elif isinstance(seconds, Mapping):
            table = dict(seconds)
            self._seconds = lambda _frame, match: table.get(match, 0.0)
        else:
            fixed = float(seconds)
            self._seconds = lambda _frame, _match: fixed
        self._paths: dict[tuple[Direction, Link], list[tuple[_Queued, Forward]]] = {}
        #: Messages released (sent on) so far, delayed or held behind a delayed one.
        self.released = 0

    def _pass(
        self, conn: Connection, link: Link, direction: Direction, frame: Frame, forward: Forward
    ) -> None:
        path = (direction, link)
        queue = self._paths.get(path)
        delay = 0.0
        if self.selects(direction, frame):
            delay = self._seconds(frame, self.matched)
        if delay <= 0 and not queue:
            forward(frame)  # nothing ahead of it: the common case costs nothing
            return
        self.fired += delay > 0
        if delay > 0:
            self.triggered.set()
        entry = _Queued(frame)
        entry.ready = delay <= 0
        self._paths.setdefault(path, []).append((entry, forward))
        if not entry.ready:
            trio.lowlevel.spawn_system_task(
                self._release_later, conn, path, entry, delay, name="OrderedDelay"
            )

    async def _release_later(
        self, conn: Connection, path: tuple[Direction, Link], entry: _Queued, delay: float
    ) -> None:
        try:
            with trio.move_on_after(delay):
                await conn.closed.wait()
        except Exception:  # a system task must not raise: it would crash the trio run
            log.exception("OrderedDelay failed")
        entry.ready = True
        queue = self._paths.get(path, [])
        while queue and queue[0][0].ready:
            head, forward = queue.pop(0)
            if conn.closed.is_set():
                head.frame.close_fds()
            else:
                self.released += 1
                forward(head.frame)
        if not queue:
            self._paths.pop(path, None)

    @property
    def holding(self) -> int:
        return sum(len(queue) for queue in self._paths.values())

    def close(self) -> None:
        paths, self._paths = self._paths, {}
        for queue in paths.values():
            for entry, _ in queue:
                entry.frame.close_fds()
