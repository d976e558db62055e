"""A link's state in the engine: its transport, the commands received on it and not yet done,
and the load it holds for the peer (see :mod:`vfiouser_trio.engine`'s module doc for the
bounds the reader keeps with it).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import trio

from .protocol.connection import FRAME_OVERHEAD
from .protocol.framing import Frame
from .transport import Transport

if TYPE_CHECKING:
    from .engine import Connection, Link


class CommandQueue:
    """Commands received on one link, in arrival order (an ordering.CommandSource).

    Counts the commands it was given until they are done (``release``), also once a policy
    has taken them or while one runs inline in the reader (``hold``): ``held``, ``cost``
    (bytes with ``FRAME_OVERHEAD`` each) and ``fd_count``. The reader bounds these by not
    reading (see the module doc), and is woken whenever a command is done. ``adopted`` is
    the stand-in of an inline command that had to wait (see :meth:`adopt`).
    """

    __slots__ = ("_frames", "_link", "_lot", "adopted", "cost", "fd_count", "held", "starter")

    def __init__(self, link: LinkState) -> None:
        # The deque and the parking lot are created when first needed: an idle link
        # queues nothing (its commands run inline), and each costs hundreds of bytes.
        self._frames: deque[Frame] | None = None
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._link = link
        self.held = 0
        self.cost = 0
        self.fd_count = 0
        self.adopted: Frame | None = None
        #: Starts the policy's run when the first command is queued (then None).
        self.starter: Connection | None = None

    def _queue(self) -> deque[Frame]:
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        return frames

    def _queued(self) -> None:
        starter = self.starter
        if starter is not None:
            self.starter = None
            starter._start_dispatcher(self._link)
        if self._lot:
            self._lot.unpark()

    def hold(self, frame: Frame) -> None:
        """Count ``frame`` until it is released, without queueing it."""
        self.held += 1
        self.cost += FRAME_OVERHEAD + len(frame.payload)
        if frame.fds:
            self.fd_count += len(frame.fds)

    def put(self, frame: Frame) -> None:
        self.hold(frame)
        self._queue().append(frame)
        self._queued()

    def adopt(self, stand_in: Frame) -> None:
        """Queue the stand-in of an inline command that is still running, so that the policy
        orders the commands after it as if it had started that command itself. It counts in
        ``held`` only (the command itself counts its cost) until :meth:`drop_stand_in`."""
        self.held += 1
        self.adopted = stand_in
        self._queue().append(stand_in)
        self._queued()

    def has_pending(self) -> bool:
        return bool(self._frames)

    def drop_stand_in(self) -> None:
        """The policy is done with the stand-in (its command is done)."""
        self.held -= 1
        self.adopted = None

    def release(self, frame: Frame, fd_count: int) -> None:
        """``frame`` is done; it held ``fd_count`` fds when it was queued."""
        self.held -= 1
        self.cost -= FRAME_OVERHEAD + len(frame.payload)
        self.fd_count -= fd_count
        self._link.wake()

    async def get(self) -> Frame:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._frames:
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
            await self._lot.park()
        return self._queue().popleft()

    def close(self) -> None:
        frames = self._frames
        while frames:
            frame = frames.popleft()
            if frame is self.adopted:
                self.drop_stand_in()
            else:
                self.release(frame, len(frame.fds))
                frame.close_fds()


class LinkState:
    __slots__ = (
        "adopted_done",
        "commands",
        "dispatched",
        "link",
        "on_demand",
        "progress",
        "reading",
        "transport",
    )

    def __init__(self, link: Link, transport: Transport, *, bounded: bool) -> None:
        self.link = link
        self.transport = transport
        #: Where the reader (and a dispatcher held by the send backlog) wait for the load to
        #: fall (:meth:`wait`): woken when a command leaves the queue, the socket takes
        #: data, or a request is sent on this link. Created when first needed.
        self.progress: trio.lowlevel.ParkingLot | None = None
        self.commands = CommandQueue(self)
        #: Commands started (by the dispatcher or inline) since the link last yielded.
        self.dispatched = 0
        #: Set when the inline command whose stand-in the policy holds is done.
        self.adopted_done: trio.Event | None = None
        #: The link is read only while a request of ours awaits its reply or the peer sends
        #: something (the server's twin link); ``reading`` while a reader runs.
        self.on_demand = False
        self.reading = True
        if bounded:
            transport.on_progress = self.wake

    def wake(self) -> None:
        if self.progress:
            self.progress.unpark_all()

    async def wait(self) -> None:
        """Wait for the next :meth:`wake`."""
        if self.progress is None:
            self.progress = trio.lowlevel.ParkingLot()
        await self.progress.park()

    @property
    def load(self) -> int:
        return self.transport.backlog + self.commands.cost
