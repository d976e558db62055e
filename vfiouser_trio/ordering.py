"""Ordering policies: when the commands a peer sent are processed, and so when replies leave.

The engine hands each link's incoming commands to a policy as a :class:`CommandSource` (arrival
order) together with a ``process`` coroutine function. ``process(frame)`` runs the owner's
handler and queues the reply (or error reply); it never raises except for cancellation, and it
takes ownership of the frame's file descriptors. The policy only decides *when* each ``process``
call starts, which fixes both the processing order and the order replies leave in.

Writing a policy needs no engine change: subclass :class:`OrderingPolicy` and implement
``run``. ``run`` may be called once per link (main socket, twin socket) at the same time, so
keep per-run state in local variables. A frame the policy takes from the source but never
passes to ``process`` (for example when it is cancelled) must be closed with
``frame.close_fds()``.
"""

from __future__ import annotations

import abc
import math
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Protocol

import trio

from .protocol.constants import Command
from .protocol.framing import Frame

#: Runs one command to completion: handler, then reply. Never raises except trio.Cancelled.
ProcessCommand = Callable[[Frame], Awaitable[None]]


class CommandSource(Protocol):
    """The commands received on one link, in arrival order."""

    async def get(self) -> Frame:
        """Next command. A cancellation point; it yields only when it has to wait, so commands
        received together are processed in one scheduler step and their replies can leave in
        one ``sendmsg``."""
        ...


class OrderingPolicy(abc.ABC):
    """Decides when each received command is processed.

    ``runs_inline`` (False unless a policy sets it) lets the engine run a command in the
    link's reader, without a task switch, when the link holds no other command: nothing
    queued, nothing running. Set it when such a command would be started at once anyway.
    A command that then has to wait reaches ``run`` after all, as a stand-in frame that
    ``process`` completes when the command is done, so the policy orders the commands
    after it as usual.
    """

    #: Whether a command may run inline in the reader when the link is idle (see above).
    runs_inline: bool = False

    @abc.abstractmethod
    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        """Take commands from ``commands`` until cancelled and ``process`` each one."""


class SpecOrder(OrderingPolicy):
    """The spec's rule (Command Concurrency): one command at a time, in arrival order.

    Replies therefore leave in arrival order, and a No_reply command is fully processed before
    the reply to any younger command is sent.
    """

    runs_inline = True

    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        while True:
            await process(await commands.get())


class ConcurrentOrder(OrderingPolicy):
    """Process up to ``limit`` commands at once; replies leave in completion order.

    Starting order is still arrival order. Not spec-conformant (a No_reply command may still be
    running when a younger command's reply leaves): a tool to prototype with.
    """

    runs_inline = True

    def __init__(self, limit: int | float = math.inf) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit

    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        slots = trio.CapacityLimiter(self.limit)

        async def run_one(frame: Frame, token: object) -> None:
            try:
                await process(frame)
            finally:
                slots.release_on_behalf_of(token)

        async with trio.open_nursery() as nursery:
            while True:
                token = object()
                await slots.acquire_on_behalf_of(token)
                try:
                    frame = await commands.get()
                except BaseException:
                    slots.release_on_behalf_of(token)
                    raise
                nursery.start_soon(run_one, frame, token)


#: Maps a command to its concurrency key; None means "a barrier: run alone".
KeyFunction = Callable[[Frame], Hashable | None]


class KeyedOrder(OrderingPolicy):
    """Commands with the same key run one at a time in arrival order; different keys overlap.

    A command whose key is None is a barrier: it waits until every running command has finished,
    runs alone, and commands after it wait for it. With :func:`region_key` this lets accesses to
    different regions proceed concurrently while everything else stays serialised.
    """

    runs_inline = True

    def __init__(self, key: KeyFunction) -> None:
        self.key = key

    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        lanes: dict[Hashable, deque[Frame]] = {}
        all_idle = trio.lowlevel.ParkingLot()

        async def drain(key: Hashable) -> None:
            lane = lanes[key]
            try:
                while lane:
                    await process(lane.popleft())
            finally:
                del lanes[key]
                for frame in lane:  # left over only when cancelled
                    frame.close_fds()
                if not lanes:
                    all_idle.unpark_all()

        async with trio.open_nursery() as nursery:
            while True:
                frame = await commands.get()
                try:
                    key = self.key(frame)
                except Exception:
                    key = None  # let the handler reject what the key function could not read
                if key is None:
                    try:
                        while lanes:
                            await all_idle.park()
                    except BaseException:
                        frame.close_fds()
                        raise
                    await process(frame)
                elif (lane := lanes.get(key)) is not None:
                    lane.append(frame)
                else:
                    lanes[key] = deque((frame,))
                    nursery.start_soon(drain, key)


# REGION_READ / REGION_WRITE payload: offset u64, region u32, count u32.
_REGION_INDEX = struct.Struct("=I")
_REGION_COMMANDS = frozenset({Command.REGION_READ, Command.REGION_WRITE})


def region_key(frame: Frame) -> int | None:
    """Key function for :class:`KeyedOrder`: the region index of REGION_READ/WRITE, else None."""
    if frame.header.command in _REGION_COMMANDS and len(frame.payload) >= 12:
        index: int = _REGION_INDEX.unpack_from(frame.payload, 8)[0]
        return index
    return None
