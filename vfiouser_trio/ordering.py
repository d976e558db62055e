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

A policy that wants more than ``run`` offers overrides :meth:`OrderingPolicy.serve` instead:
it gets a :class:`PolicyContext` (the connection and link it orders, this side's outstanding
requests, the clock) and may split a command in two, running it at once and releasing its
reply later (``job = ctx.execute(frame)``, ``await job.release_reply()``), so commands can run
concurrently yet answer in order. Every policy declares the spec relaxations it makes
(:attr:`OrderingPolicy.relaxations`, a tuple of :class:`Relaxation`): which older/younger
pairs it may reorder, for :mod:`vfiouser_trio.testing.order_check` to allow.
"""

from __future__ import annotations

import enum
import math
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from .protocol.constants import Command
from .protocol.framing import Frame

if TYPE_CHECKING:  # the engine imports this module
    from .engine import Connection, Link

#: Runs one command to completion: handler, then reply. Never raises except trio.Cancelled.
ProcessCommand = Callable[[Frame], Awaitable[None]]
#: Awaited between a command's handler and its reply (see :meth:`PolicyContext.execute`).
ReleaseGate = Callable[[], Awaitable[None]]
#: The engine's ``process`` with its optional gate: ``await process(frame, release)``; with a
#: gate, the reply (or error reply) waits until ``release()`` returns. No_reply commands have
#: no reply to hold: the gate is not called for them.
GatedProcess = Callable[[Frame, ReleaseGate | None], Awaitable[None]]
#: Maps a command to its concurrency key; None means "a barrier: run alone".
KeyFunction = Callable[[Frame], Hashable | None]


def _safe_key(key: KeyFunction, frame: Frame) -> Hashable | None:
    try:
        return key(frame)
    except Exception:
        return None  # what the key function cannot read is a barrier


@dataclass(frozen=True, slots=True)
class Relaxation:
    """Pairs of commands whose spec order a policy may break.

    The spec (https://www.qemu.org/docs/master/interop/vfio-user.html, "Command
    Concurrency") processes commands in the order they arrive, so an older command is
    processed before the reply to a younger one is sent. A relaxation names the pairs (an
    *older* command, a *younger* one received after it on the same link) for which the
    younger's reply may leave first. A pair is allowed when every condition given holds:

    * ``older`` / ``younger``: the command numbers each may have (None: any);
    * ``older_no_reply``: True for an older No_reply ("posted") command only, False for one
      with a reply only, None for either;
    * ``key``: both commands have a key that is not None and the keys differ (a key function
      as for :class:`KeyedOrder`; one that raises counts as None).

    For example "reads may overtake posted writes to other regions"::

        Relaxation("reads pass posted writes", older={Command.REGION_WRITE},
                   younger={Command.REGION_READ}, older_no_reply=True, key=region_key)
    """

    #: Says what the relaxation allows, in reports.
    reason: str
    older: Collection[int] | None = None
    younger: Collection[int] | None = None
    older_no_reply: bool | None = None
    key: KeyFunction | None = None

    def __post_init__(self) -> None:
        for name in ("older", "younger"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, frozenset(int(c) for c in value))

    def allows(self, older: Frame, younger: Frame) -> bool:
        """Whether ``younger``'s reply may leave before ``older`` is processed."""
        if self.older is not None and older.header.command not in self.older:
            return False
        if self.younger is not None and younger.header.command not in self.younger:
            return False
        if self.older_no_reply is not None and older.header.no_reply != self.older_no_reply:
            return False
        if self.key is not None:
            old_key, young_key = _safe_key(self.key, older), _safe_key(self.key, younger)
            if old_key is None or young_key is None or old_key == young_key:
                return False
        return True


def allowed(relaxations: Collection[Relaxation], older: Frame, younger: Frame) -> Relaxation | None:
    """The first of ``relaxations`` allowing the pair, or None (the spec's order holds)."""
    for relaxation in relaxations:
        if relaxation.allows(older, younger):
            return relaxation
    return None


class Processing(enum.Enum):
    """The moments of a command's processing a :class:`PolicyContext` reports."""

    #: The policy started the command (``process`` was called).
    START = "start"
    #: The command is done: handler run and reply (if any) queued for the socket.
    END = "end"


class CommandJob:
    """One command started by :meth:`PolicyContext.execute`: its handler runs at once, its
    reply leaves only once released."""

    __slots__ = ("_done", "_handled", "_released", "header")

    def __init__(self, frame: Frame) -> None:
        #: The command's header (command, message ID, No_reply).
        self.header = frame.header
        self._handled = trio.Event()
        self._released = trio.Event()
        self._done = trio.Event()

    @property
    def handled(self) -> bool:
        """True once the handler has finished (its reply is ready or, No_reply, none is due)."""
        return self._handled.is_set()

    @property
    def done(self) -> bool:
        """True once the command is done (its reply, if any, queued for the socket)."""
        return self._done.is_set()

    async def wait_handled(self) -> None:
        """Wait until the handler has finished."""
        await self._handled.wait()

    def release(self) -> None:
        """Let the reply leave as soon as it is ready (returns at once)."""
        self._released.set()

    async def release_reply(self) -> None:
        """Let the reply leave and wait until the command is done."""
        self._released.set()
        await self._done.wait()

    async def wait_done(self) -> None:
        await self._done.wait()

    async def _gate(self) -> None:
        self._handled.set()
        await self._released.wait()


class PolicyContext:
    """What a policy's :meth:`~OrderingPolicy.serve` gets for one link of one connection.

    ``commands`` (arrival order) and ``process`` are what :meth:`OrderingPolicy.run` gets;
    :meth:`execute` starts a command whose reply waits for :meth:`CommandJob.release_reply`.
    Built by the engine; ``observer`` (the connection's hooks) is told of every command's
    :class:`Processing` start and end when it has an ``on_processing(conn, link, frame,
    phase)`` method (the tracer has).
    """

    __slots__ = ("_gated", "_nursery", "_observe", "commands", "connection", "link", "running")

    def __init__(
        self,
        connection: Connection,
        link: Link,
        commands: CommandSource,
        process: GatedProcess,
        *,
        observer: object = None,
    ) -> None:
        #: The engine's Connection (``.name`` names it in logs, ``.core`` its protocol state).
        self.connection = connection
        #: The link (``Link.MAIN`` or ``Link.TWIN``) whose commands this context orders.
        self.link = link
        self.commands = commands
        #: Commands started and not yet done on this link.
        self.running = 0
        self._gated = process
        self._observe: Callable[[Connection, Link, Frame, Processing], None] | None = getattr(
            observer, "on_processing", None
        )
        self._nursery: trio.Nursery | None = None

    @property
    def name(self) -> str:
        """The connection's name (the device, the client), as in its log lines."""
        return self.connection.name

    @property
    def outstanding(self) -> int:
        """This side's requests to the peer awaiting their reply now."""
        return self.connection.core.awaiting_replies

    @staticmethod
    def now() -> float:
        """The clock: ``trio.current_time()`` (virtual under a MockClock)."""
        return trio.current_time()

    async def process(self, frame: Frame) -> None:
        """Run ``frame`` to completion (handler, then reply): :data:`ProcessCommand`."""
        await self._run(frame, None)

    async def _run(self, frame: Frame, gate: ReleaseGate | None) -> None:
        observe = self._observe
        self.running += 1
        if observe is not None:
            observe(self.connection, self.link, frame, Processing.START)
        try:
            await self._gated(frame, gate)
        finally:
            self.running -= 1
            if observe is not None:
                observe(self.connection, self.link, frame, Processing.END)

    def execute(self, frame: Frame) -> CommandJob:
        """Start ``frame`` now in a task of the context's; its reply waits for the job's
        :meth:`~CommandJob.release` (a No_reply command has none to wait for)."""
        if self._nursery is None:
            raise RuntimeError("execute() is for a policy's serve(), while it runs")
        job = CommandJob(frame)
        self._nursery.start_soon(self._run_job, frame, job)
        return job

    async def _run_job(self, frame: Frame, job: CommandJob) -> None:
        try:
            await self._run(frame, job._gate)
        finally:
            job._handled.set()
            job._done.set()


async def run_policy(policy: OrderingPolicy, ctx: PolicyContext) -> None:
    """Run ``policy`` on one link (what the engine starts): its ``serve(ctx)``, with the
    nursery :meth:`PolicyContext.execute` starts jobs in."""
    async with trio.open_nursery() as nursery:
        ctx._nursery = nursery
        await policy.serve(ctx)


class CommandSource(Protocol):
    """The commands received on one link, in arrival order."""

    async def get(self) -> Frame:
        """Next command. A cancellation point; it yields only when it has to wait, so commands
        received together are processed in one scheduler step and their replies can leave in
        one ``sendmsg``."""
        ...


class OrderingPolicy:
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
    #: The spec relaxations the policy makes (empty: the spec's order); the order checker
    #: allows exactly these.
    relaxations: tuple[Relaxation, ...] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None) and (
            cls.run is OrderingPolicy.run and cls.serve is OrderingPolicy.serve
        ):
            raise TypeError(f"{cls.__name__} must implement run() or serve()")

    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        """Take commands from ``commands`` until cancelled and ``process`` each one."""
        raise NotImplementedError

    async def serve(self, ctx: PolicyContext) -> None:
        """Order one link's commands with a :class:`PolicyContext`; by default
        ``run(ctx.commands, ctx.process)``. Override this or :meth:`run`."""
        await self.run(ctx.commands, ctx.process)


class SpecOrder(OrderingPolicy):
    """The spec's rule (Command Concurrency): one command at a time, in arrival order.

    Replies therefore leave in arrival order, and a No_reply command is fully processed before
    the reply to any younger command is sent.
    """

    runs_inline = True
    relaxations = ()

    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        while True:
            await process(await commands.get())


class ConcurrentOrder(OrderingPolicy):
    """Process up to ``limit`` commands at once; replies leave in completion order.

    Starting order is still arrival order. Not spec-conformant (a No_reply command may still be
    running when a younger command's reply leaves): a tool to prototype with.
    """

    runs_inline = True
    relaxations: tuple[Relaxation, ...] = (
        Relaxation("ConcurrentOrder: replies leave in completion order"),
    )

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


class KeyedOrder(OrderingPolicy):
    """Commands with the same key run one at a time in arrival order; different keys overlap.

    A command whose key is None is a barrier: it waits until every running command has finished,
    runs alone, and commands after it wait for it. With :func:`region_key` this lets accesses to
    different regions proceed concurrently while everything else stays serialised.
    """

    runs_inline = True

    def __init__(self, key: KeyFunction) -> None:
        self.key = key
        self.relaxations = (
            Relaxation("KeyedOrder: commands with different keys overlap", key=key),
        )

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
                # What the key function cannot read is a barrier; the handler rejects it.
                key = _safe_key(self.key, frame)
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
