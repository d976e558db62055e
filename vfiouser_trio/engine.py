"""The connection engine: one vfio-user connection, commands and replies in both directions.

The protocol's rules (message IDs and reply matching, reserved IDs of cancelled requests,
which received message gets which answer, No_reply, VERSION first, the limits and when a
link stops reading) are :class:`~vfiouser_trio.protocol.connection.ConnectionCore`'s, a
sans-io object; the engine moves bytes, fds and wake-ups and runs the handlers.

A :class:`Connection` owns one socket (the *main* link) and, once twin-socket mode is
negotiated, a second one (the *twin* link). A link's reader passes replies to the request
waiting for them and commands to the link's dispatcher, which runs them through the owner's
handler in the order an :class:`~vfiouser_trio.ordering.OrderingPolicy` decides. Because
reading never waits for a handler, a handler may itself send a request to the peer and
await its reply: the deadlock described in docs/architecture.md cannot happen, on one
socket or on two.

The fast path: when a link holds no other command and its policy allows it
(``OrderingPolicy.runs_inline``), the reader runs a command itself, with no task switch
between the read and the reply, up to the handler's first wait: a handler that completes
without waiting (most register accesses) is answered at once; one that would wait hands the
reader's role to a fresh reader task, finishes in the former reader's task, and is adopted
by the policy through a stand-in, so the commands after it are ordered as if the dispatcher
had started it.

Which socket carries what:

* a reply always leaves on the link its command arrived on;
* requests this side originates go on the main link, except after
  ``attach_twin(..., requests_on_twin=True)`` (the server, which created the twin pair), when
  they go on the twin link; a reply must arrive on the link its request went on (the core's
  rule: elsewhere it closes the connection);
* commands arriving on either link are dispatched, each link with its own policy run, so
  server-to-client commands are not queued behind client-to-server ones; the peer's end of
  stream on either link closes the connection;
* no task reads the server's twin link (it carries only our requests and the peer's
  replies, spec "twin_socket"): the trio run's :class:`~vfiouser_trio.idle_watch.IdleWatch`
  reads it when data or a hang-up arrives, and starts a reader task for it only while it
  holds commands; while a request of ours awaits its reply there, the requester's task
  reads it instead (one wake-up per reply, not the watch's and then the requester's).

Besides the core's rules: a handler raising :class:`VfioUserError` (or ProtocolError)
answers with its errno, any other exception is logged and answered with EIO; more fds than
``max_recv_fds`` truncated by the kernel (MSG_CTRUNC) close the connection; the peer's end
of stream (or a failed send) closes it, also for commands still queued (vfio-user has no
half-close); pending requests then fail with :class:`ConnectionClosedError` (ECONNRESET)
and later ones at once with ENOTCONN. With ``reply_timeout`` set, a peer that leaves one of
our requests unanswered for that long (up to a quarter more: the core's reply clock) closes
the connection too, with :class:`~vfiouser_trio.protocol.connection.ReplyTimeout`: the
requester is woken wherever it waits (also on a socket it reads itself) and no request pays
for a deadline of its own.

Bounded memory and fairness (per link; the server sets the limits, a client by default has
none but the yielding): with ``max_send_backlog`` set, a link's *load* is what it holds for
the peer: commands received and not yet done (``FRAME_OVERHEAD`` each plus their payload)
and data the socket has not taken (:attr:`Transport.backlog
<vfiouser_trio.transport.Transport.backlog>`). At the mark the reader pauses until the load
halves (near it, it reads in smaller pieces), except on a link carrying a reply we await,
which reads on and is closed at twice the mark (ENOBUFS); the dispatcher starts no command
while the send backlog alone is at the mark (a 32-byte REGION_READ may ask for a 1 MiB
reply). So a client that never reads costs about twice the mark and one reply. The
dispatcher yields after every ``dispatch_batch`` commands and reads complete about
``FRAMES_PER_READ`` frames each, so one pipelining peer cannot starve other connections.

An idle connection costs little: writer and dispatcher tasks, queues and parking lots are
created when first needed, transports share their thread's receive buffer, and with
:meth:`Connection.run` the owner's task is the main link's reader.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass
from functools import partial
from inspect import isawaitable
from types import CoroutineType
from typing import Any

import trio

from .link_state import LinkState
from .ordering import OrderingPolicy, PolicyContext, ReleaseGate, SpecOrder, run_policy
from .protocol.connection import (
    DEFAULT_DISPATCH_BATCH,
    DISPATCH,
    FRAME_OVERHEAD,
    REPLY_CHECKS,
    Close,
    ConnectionClosedError,
    ConnectionCore,
    Ignore,
    ReadAction,
    ReplyArrived,
    ReplyTimeout,
    ReplyTooManyFds,
    RequestFailed,
    Role,
    SendError,
)
from .protocol.constants import DEFAULT_MAX_MSG_FDS
from .protocol.errors import ProtocolError, VfioUserError
from .protocol.framing import (
    DEFAULT_MAX_MSG_SIZE,
    BrokenStream,
    Frame,
    FrameEvent,
    OversizedFrame,
    StrayFds,
    close_fds,
)
from .protocol.header import Header
from .protocol.message import Buffer, Message, Request
from .transport import MIN_READ, SEND_HIGH_WATER, Pieces, Transport, byte_pieces

__all__ = [
    "DEFAULT_DISPATCH_BATCH",
    "FRAME_OVERHEAD",
    "Connection",
    "ConnectionClosedError",
    "ConnectionHooks",
    "Forward",
    "FramingError",
    "Handler",
    "HandlerResult",
    "Link",
    "PendingReply",
    "RawMessage",
    "ReplyTimeout",
    "Role",
    "open_connection",
]

log = logging.getLogger(__name__)


class Link(enum.Enum):
    """Which socket of a connection a frame travels on."""

    MAIN = "main"
    TWIN = "twin"


@dataclass(frozen=True, slots=True)
class RawMessage:
    """An untyped message body: payload bytes and the fds to send with them.

    ``payload`` may be a tuple of buffers (``Pieces``), sent as iovecs without being joined
    (e.g. a DMA header and a view of the data); a view must stay valid until the reply is
    queued (the transport copies what it cannot send at once; a policy that holds the reply
    makes the engine join the pieces first). With ``transfer_fds`` the engine owns ``fds``
    and closes them once sent (or when the connection closes); otherwise the sender keeps them.
    """

    payload: Buffer | Pieces = b""
    fds: Sequence[int] = ()
    transfer_fds: bool = False


#: What a handler returns: the reply body (a typed message, a raw one, its packed payload
#: as ``bytes``, or None for an empty reply). Ignored for No_reply commands.
HandlerResult = Message | RawMessage | bytes | None
#: The owner's command handler: an awaitable of the result (an ``async def``), or the result
#: itself when it has it at once (then no coroutine runs: the cheapest way to answer). It
#: may take the frame's fds (``frame.take_fds()``); the engine closes the ones it leaves.
#: Raising VfioUserError sends an error reply.
Handler = Callable[[Frame], Awaitable[HandlerResult] | HandlerResult]
#: Framing problems the decoder reports instead of a frame.
FramingError = OversizedFrame | StrayFds | BrokenStream
#: Passes a frame on to the next stage (the socket, or the engine's demultiplexer).
Forward = Callable[[Frame], None]


class ConnectionHooks:
    """Observes and may alter every frame, for tracing and fault injection.

    Subclass and override. Both methods run synchronously on the engine's paths and must not
    block. A hook passes a frame on by calling ``forward(frame)`` - now, later (delay, from a
    task of its own), out of order (reorder), with a different frame, or never (drop: it then
    owns the frame and must ``frame.close_fds()`` it). Outgoing frames given to a hook always own
    their fds. To simulate a disconnect, call ``conn.close()``. With no hooks installed the
    engine skips all of this.
    """

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        """Called for every frame this side sends, before it is queued on the socket."""
        forward(frame)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        """Called for every complete frame received, before it is demultiplexed."""
        forward(frame)

    def on_framing_error(self, conn: Connection, link: Link, event: FramingError) -> None:
        """Called (for the record only) for each oversized frame, stray fds or broken stream."""


class _PendingRequest:
    """The engine's side of a request waiting for its reply: what wakes the requester."""

    __slots__ = ("done", "error", "frame")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.frame: Frame | None = None
        self.error: VfioUserError | None = None

    def deliver(self, frame: Frame) -> None:
        self.frame = frame
        self.done.set()

    def fail(self, error: VfioUserError) -> None:
        self.error = error
        self.done.set()

    def result(self, core: ConnectionCore[_PendingRequest], command: int) -> Frame:
        """Once done: the reply frame of ``command`` (the caller owns its fds), or raise the
        failure or the error reply (``core.reply_result``)."""
        if self.error is not None:
            raise self.error
        assert self.frame is not None
        return core.reply_result(self.frame, command)


class Connection:
    """One vfio-user connection: run it with :func:`open_connection`, or :meth:`run`."""

    # Slots: a server keeps one per client, and 1,000 idle ones should fit in 16 MiB.
    __slots__ = (
        "_handler",
        "_hooks",
        "_id_lot",
        "_main",
        "_nursery",
        "_policy",
        "_reply_clock",
        "_reply_timeout",
        "_request_link",
        "_run_task",
        "_scope",
        "_twin",
        "close_reason",
        "closed",
        "core",
        "name",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        handler: Handler,
        policy: OrderingPolicy | None = None,
        hooks: ConnectionHooks | None = None,
        role: Role = Role.PEER,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        max_recv_fds: int = DEFAULT_MAX_MSG_FDS,
        max_send_fds: int = DEFAULT_MAX_MSG_FDS,
        max_send_backlog: int | None = None,
        dispatch_batch: int = DEFAULT_DISPATCH_BATCH,
        reply_timeout: float | None = None,
        name: str = "vfio-user",
    ) -> None:
        if reply_timeout is not None and not reply_timeout > 0:
            sock.close()  # the connection owns the socket from the start
            raise ValueError("reply_timeout must be positive (or None: wait for ever)")
        try:
            #: The protocol's state and rules (sans-io): message IDs, pending requests, limits.
            self.core: ConnectionCore[_PendingRequest] = ConnectionCore(
                role=role,
                max_msg_size=max_msg_size,
                max_recv_fds=max_recv_fds,
                max_send_fds=max_send_fds,
                max_send_backlog=max_send_backlog,
                dispatch_batch=dispatch_batch,
            )
            self._main = self._new_link(Link.MAIN, sock)
        except BaseException:
            sock.close()  # the connection owns the socket from the start
            raise
        #: Names the connection (the device, the client) in log messages.
        self.name = name
        self._handler = handler
        self._policy = policy if policy is not None else SpecOrder()
        self._hooks = hooks
        #: Seconds the peer has to answer our requests before the connection closes.
        self._reply_timeout = reply_timeout
        self._reply_clock = False  # its task runs (only while requests wait)
        self._twin: LinkState | None = None
        self._request_link = self._main
        self._id_lot: trio.lowlevel.ParkingLot | None = None  # created when first needed
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._run_task: trio.lowlevel.Task | None = None
        #: Set once the connection has closed, for whatever reason.
        self.closed = trio.Event()
        #: Why the connection closed: None for a local close or a clean end of stream.
        self.close_reason: BaseException | None = None

    # ----------------------------------------------------------------- configuration

    def _new_link(self, link: Link, sock: socket.socket) -> LinkState:
        core = self.core
        transport = Transport(sock, max_msg_size=core.max_msg_size, max_recv_fds=core.max_recv_fds)
        return LinkState(link, transport, bounded=core.max_send_backlog is not None)

    def _links(self) -> tuple[LinkState, ...]:
        return (self._main,) if self._twin is None else (self._main, self._twin)

    @property
    def max_msg_size(self) -> int:
        """Largest message accepted from the peer, on every link."""
        return self.core.max_msg_size

    @property
    def max_send_fds(self) -> int:
        """Most fds the peer accepts in one message (its ``max_msg_fds``)."""
        return self.core.max_send_fds

    @max_send_fds.setter
    def max_send_fds(self, value: int) -> None:
        self.core.max_send_fds = value

    @property
    def next_message_id(self) -> int:
        """The message ID the next request will try first (IDs in flight are skipped)."""
        return self.core.next_message_id

    @next_message_id.setter
    def next_message_id(self, value: int) -> None:
        self.core.next_message_id = value

    @property
    def has_twin(self) -> bool:
        return self._twin is not None

    @property
    def held_bytes(self) -> int:
        """Memory held for the peer now, on every link: commands received and not yet
        done plus data not yet taken by the socket (see the module doc); with
        ``max_send_backlog`` set, it stays near that mark."""
        return sum(state.load for state in self._links())

    def attach_twin(self, sock: socket.socket | int, *, requests_on_twin: bool) -> None:
        """Start using a twin socket (negotiated in VERSION); the connection takes ownership.

        The server creates a socket pair, sends one end in its VERSION reply and attaches its
        own end with ``requests_on_twin=True``: its server-to-client requests then go on the
        twin. The client attaches the end it received with ``requests_on_twin=False``: it
        answers the commands arriving there on the twin and keeps sending its own requests on
        the main socket.
        """
        try:
            nursery = self._check_can_attach_twin()
            if isinstance(sock, int):
                sock = socket.socket(fileno=sock)
            twin = self._new_link(Link.TWIN, sock)
        except BaseException as exc:
            if isinstance(sock, int):
                close_fds((sock,))
            else:
                sock.close()
            if isinstance(exc, (OSError, ValueError)):
                raise ProtocolError(f"unusable twin socket: {exc}") from exc
            raise
        self._twin = twin
        self._start_link(twin)
        if requests_on_twin:
            # The twin carries our commands and the peer's replies (spec: "twin_socket"): no
            # task reads it, the run's idle watch does (the peer may also leave there,
            # keeping the main socket open in another process).
            self._request_link = twin
            twin.on_demand = True
            twin.reading = False
            twin.transport.watch_idle(partial(self._read_watched, twin))
        else:
            nursery.start_soon(self._read_loop, twin)

    def _check_can_attach_twin(self) -> trio.Nursery:
        if self.closed.is_set():
            raise ConnectionClosedError(errno=errno.ENOTCONN)
        if self._nursery is None:
            raise RuntimeError("attach_twin needs a running connection")
        if self._twin is not None:
            raise ProtocolError("a twin socket is already attached")
        return self._nursery

    # ----------------------------------------------------------------- running

    def _start_link(self, state: LinkState) -> None:
        # The writer and the dispatcher start when first needed: on an idle connection (most
        # commands run inline, most replies leave at once) a link holds its reader alone.
        assert self._nursery is not None
        state.transport.writer_nursery = self._nursery
        state.commands.starter = self

    def _start_dispatcher(self, state: LinkState) -> None:
        if self._nursery is not None:
            process = partial(self._process, state)
            ctx = PolicyContext(self, state.link, state.commands, process, observer=self._hooks)
            self._nursery.start_soon(run_policy, self._policy, ctx)

    async def run(self) -> None:
        """Run the connection in the calling task until it has closed, its tasks done.

        The calling task reads the main link: an owner that would only wait for the end
        (a server's session) spends a task and a nursery less than with
        :func:`open_connection`. Call it once, on a connection made with ``Connection(...)``;
        when it returns (or is cancelled) the connection is closed.
        """
        await self._run()

    async def _run(self, *, task_status: trio.TaskStatus[None] | None = None) -> None:
        try:
            running = _CONNECTIONS.get()
        except LookupError:
            running = [0]
            _CONNECTIONS.set(running)
        running[0] += 1
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._scope = nursery.cancel_scope
                self._start_link(self._main)
                if task_status is not None:
                    # This task becomes the main link's first reader once open_connection
                    # has handed the connection to its owner (a handler may need the
                    # owner's hold).
                    self._run_task = trio.lowlevel.current_task()
                    task_status.started()
                    await trio.lowlevel.wait_task_rescheduled(
                        lambda _: trio.lowlevel.Abort.SUCCEEDED
                    )
                await self._read_loop(self._main)
        finally:
            running[0] -= 1
            self._nursery = None
            self._shutdown(None, "connection closed")

    def close(self) -> None:
        """Close the connection now: fail pending requests, close sockets and owned fds."""
        self._shutdown(None, "connection closed locally")

    async def aclose(self) -> None:
        """Close gracefully: wait until queued outgoing frames are sent, then close.

        Waits as long as the peer takes to read them; if cancelled, closes at once.
        """
        try:
            for state in self._links():
                with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    await state.transport.drain()
            await trio.lowlevel.checkpoint()
        finally:
            self.close()

    async def wait_closed(self) -> None:
        """Wait until the connection has closed (peer disconnect, fatal error, close())."""
        await self.closed.wait()

    def _shutdown(self, reason: BaseException | None, message: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        for state in self._links():
            state.transport.close()
            state.commands.close()
        for command, request in self.core.close():
            error = ConnectionClosedError(message, command=command)
            error.__cause__ = reason
            request.fail(error)
        if self._id_lot:
            self._id_lot.unpark_all()
        if self._scope is not None:
            self._scope.cancel()
        self.closed.set()

    # ----------------------------------------------------------------- receiving

    async def _read_loop(self, state: LinkState, carried: Sequence[FrameEvent] = ()) -> None:
        """Read the link until it ends; ``carried``: events a previous reader left unhandled.

        Commands run inline here when the policy allows it and nothing is ahead of them. If an
        inline command would block, the reader hands its role to a fresh reader task (which
        takes the rest of the events) and finishes that command as an ordinary task: reading
        never waits for a handler that waits, so the guarantee of the module doc holds.
        """
        transport = state.transport
        reason: BaseException | None = None
        core = self.core
        limit = core.max_send_backlog
        bounded = limit is not None
        inline = self._policy.runs_inline
        commands = state.commands
        hooks = self._hooks
        events = carried
        suspended: Coroutine[Any, Any, None] | None = None
        try:
            while reason is None:
                if not events:
                    if state.on_demand and not state.load and not transport.closed:
                        # Nothing held any more: the idle watch reads the link again.
                        state.reading = False
                        transport.watch_idle(partial(self._read_watched, state))
                        return
                    if not bounded or not state.load:
                        events = await transport.receive()  # nothing held: no bound to keep
                    else:
                        reason = await self._hold_reading(state)
                        if reason is not None:
                            break
                        events = await transport.receive(core.read_budget(state.load, MIN_READ))
                    if not state.commands.held:
                        # The read yielded (a receive always does) while nothing of this link
                        # ran or waited but this task: the next commands start a new batch
                        # (at one command per read, no yield of its own every batch).
                        state.dispatched = 0
                    if not events:
                        if not transport.at_frame_boundary:
                            log.debug("%s link: peer hung up mid-frame", state.link.value)
                        break
                if hooks is not None:
                    reason = self._receive_queued(state, events)
                    events = ()
                    continue
                # The fast path: no enumerate, no per-event objects (this runs per command).
                index, count = 0, len(events)
                # The replies to a read's commands leave together, in one sendmsg when the
                # read's commands are done or the reader yields first (uncork before any
                # wait: a reply held while a handler waits could be what the peer awaits).
                corked = count > 1
                if corked:
                    transport.cork()
                try:
                    while index < count:
                        event = events[index]
                        index += 1
                        if not isinstance(event, Frame):
                            reason = self._act(state, core.receive_framing_error(event))
                            if reason is not None:
                                break
                            continue
                        action = core.receive(event, state)
                        if action is not DISPATCH:
                            reason = self._act(state, action)
                            if reason is not None:
                                break
                            continue
                        if (
                            state.dispatched >= core.cut_check
                            and inline
                            and not commands.held
                            and self._cut_inline(state, event.header)
                        ):
                            # Fairness: inline commands count as the dispatcher's do.
                            state.dispatched = 0
                            if corked:
                                _uncork(transport)  # the replies so far go now
                            await trio.lowlevel.cancel_shielded_checkpoint()
                            if corked:
                                transport.cork()
                        # The reader runs the command itself only when the link holds no
                        # other (none queued, none running: nothing can be ahead of it,
                        # whatever the policy), the policy allows it, and the send backlog is
                        # below the mark (where the dispatcher would wait, see _process).
                        if (
                            commands.held
                            or not inline
                            or (limit is not None and transport.backlog >= limit)
                        ):
                            commands.put(event)
                            continue
                        suspended = self._run_inline(state, event)
                        if suspended is not None:
                            events = events[index:]
                            break
                    else:
                        events = ()
                finally:
                    if corked:
                        _uncork(transport)
                if suspended is not None:
                    break
        except trio.ClosedResourceError:
            # Closed by the connection (then shutdown is a no-op) or by the transport itself
            # after a failed send.
            reason = transport.send_error
        except (ProtocolError, OSError) as exc:
            reason = exc
        if suspended is not None:
            # Leader/follower: a fresh reader takes over the link before this task waits.
            assert self._nursery is not None
            self._nursery.start_soon(self._read_loop, state, events)
            await suspended
            return
        self._link_ended(state, reason)

    def _receive_queued(
        self, state: LinkState, events: Sequence[FrameEvent]
    ) -> BaseException | None:
        """Handle a read's events without running a command inline: through the hooks if
        any (a hook may forward a frame later, from a task of its own), else routed (the
        idle watch's reads); the reason to close the connection, if any."""
        hooks = self._hooks
        for event in events:
            if isinstance(event, Frame):
                if hooks is None:
                    reason = self._route(state, event)
                    if reason is not None:
                        return reason
                else:
                    hooks.on_receive(self, state.link, event, partial(self._deliver, state))
                continue
            if hooks is not None:
                hooks.on_framing_error(self, state.link, event)
            reason = self._act(state, self.core.receive_framing_error(event))
            if reason is not None:
                return reason
        return None

    def _link_ended(self, state: LinkState, reason: BaseException | None) -> None:
        if reason is not None:
            log.warning(
                "%s: %s link: closing after a fatal error: %s", self.name, state.link.value, reason
            )
        self._shutdown(reason, f"{state.link.value} socket closed")

    def _read_watched(self, state: LinkState) -> None:
        """The idle watch saw data or a hang-up on a link no task reads (the server's twin):
        handle one read here, in the watch's task (replies are delivered, commands queued for
        the dispatcher, never run inline). A link holding commands gets a reader task
        instead, which can pause reading (the bound of the module doc) and leaves once
        nothing is held."""
        if state.reading or self.closed.is_set():
            return
        if state.load:
            assert self._nursery is not None
            state.reading = True
            state.transport.unwatch_idle()
            self._nursery.start_soon(self._read_loop, state)
            return
        self._read_nowait(state)

    def _read_nowait(self, state: LinkState) -> None:
        """Read and handle what a link no reader task reads holds now, without waiting:
        replies are delivered, commands queued for the dispatcher (never run inline); the
        connection ends if the peer hung up there or the link failed."""
        transport = state.transport
        reason: BaseException | None = None
        events: list[FrameEvent] | None
        try:
            events = transport.receive_nowait()
        except trio.ClosedResourceError:
            events, reason = [], transport.send_error
        except (ProtocolError, OSError) as exc:
            events, reason = [], exc
        if events is None:
            return  # nothing complete yet
        if reason is None:
            reason = self._receive_queued(state, events)
            if reason is None and events:
                return
        self._link_ended(state, reason)  # the peer hung up there, or the link failed

    async def _await_reply(self, state: LinkState, done: trio.Event) -> None:
        """Wait for ``done``: the reply (or failure) of a request sent on ``state``.

        On a link that no task reads (the server's twin, read on demand) this task reads it
        until then, so that the reply wakes it straight from the socket instead of waking
        the idle watch's task, which would then wake this one: one task switch per request,
        not two. It stops early once the link holds commands of the peer (the idle watch
        then starts a reader for them, as it would have). A reply can only come on the link
        its request went on (the core closes the connection otherwise), so nothing else can
        set ``done`` meanwhile but the connection's end, which closes the socket waited on.
        With hooks it waits as before: a hook may deliver the reply later, from a task of its
        own, while this one would be waiting on the socket.
        """
        if state.reading or not state.on_demand or self._hooks is not None:
            await done.wait()  # a reader task, the idle watch or a hook delivers it
            return
        transport = state.transport
        state.reading = True
        transport.unwatch_idle()
        waited = False
        try:
            while not done.is_set() and not state.load:
                try:
                    await transport.wait_readable()
                except trio.ClosedResourceError:
                    break  # the connection closed: the request has failed
                waited = True
                self._read_nowait(state)
        finally:
            state.reading = False
            if not transport.closed:
                transport.watch_idle(partial(self._read_watched, state))
        if not (waited and done.is_set()):
            # (After a wait, the checkpoint is done: Event.wait would take another pass.)
            await done.wait()

    async def _hold_reading(self, state: LinkState) -> ProtocolError | None:
        """Stop reading the link until its load is below half the mark (see the module doc).

        Returns the error to close the connection with when the link cannot pause (a reply
        we await may be behind the commands) and its load has reached twice the mark.
        """
        core = self.core
        paused = False
        while True:
            pressure = core.pressure(state.load, state.commands.fd_count)
            awaited = state is self._request_link and core.awaiting_replies > 0
            action = core.read_action(pressure, paused=paused, awaited=awaited)
            if action is ReadAction.READ:
                break
            if action is ReadAction.CLOSE:
                # The reader logs it (WARNING) and closes the connection.
                return ProtocolError(
                    "the peer sends commands without reading our replies while we await its"
                    f" answer ({state.load} bytes held, {state.commands.fd_count} fds)",
                    errno=errno.ENOBUFS,
                )
            if not paused:
                paused = True
                log.debug(
                    "%s: %s link: paused reading, %d bytes held",
                    self.name,
                    state.link.value,
                    state.load,
                )
            await state.wait()
            if state.transport.closed:
                return None  # e.g. the peer hung up and a send failed: the next receive says so
        if paused:
            log.debug("%s: %s link: reading again", self.name, state.link.value)
        return None

    def _deliver(self, state: LinkState, frame: Frame) -> None:
        """Route a frame the hooks passed on (never inline: a hook may forward it later,
        from a task of its own)."""
        reason = self._route(state, frame)
        if reason is not None:
            self._link_ended(state, reason)

    def _route(self, state: LinkState, frame: Frame) -> ProtocolError | None:
        """Route one received frame that is not to run inline: a reply to its request, a
        command to the link's dispatcher; the reason to close the connection, if any."""
        event = self.core.receive(frame, state)
        if event is DISPATCH:
            state.commands.put(frame)
            return None
        return self._act(state, event)

    def _act(
        self,
        state: LinkState,
        event: object,
    ) -> ProtocolError | None:
        """Carry out what the core decided about a received message (not a command to run);
        returns the reason to close the connection, if it must."""
        if self._id_lot:
            self._id_lot.unpark()  # a reply may have freed a message ID
        if isinstance(event, ReplyArrived):
            event.waiter.deliver(event.frame)
        elif isinstance(event, RequestFailed):
            event.waiter.fail(event.error)
        elif isinstance(event, SendError):
            log.debug(
                "%s: rejected message %d (command %d): %s",
                self.name,
                event.msg_id,
                event.command,
                event.why,
            )
            self._send_reply(state, event.header())
        elif isinstance(event, Ignore):
            if event.why is not None:
                log.warning("%s: %s link: %s", self.name, state.link.value, event.why)
        elif isinstance(event, Close):
            if event.answer is not None:
                self._send_reply(state, event.answer.header())
            return event.reason
        return None

    def _cut_inline(self, state: LinkState, header: Header) -> bool:
        """Whether the reader yields before the inline command ``header`` (the core's
        ``cut_before``, told whether this connection is alone in the trio run). Alone, the
        count restarts, so that it is asked again a batch later, not at every command."""
        core = self.core
        alone = _CONNECTIONS.get()[0] < 2
        if core.cut_before(state.dispatched, header, alone=alone):
            return True
        if alone and core.cut_hook is None:
            state.dispatched = 0
        return False

    def _run_inline(self, state: LinkState, frame: Frame) -> Coroutine[Any, Any, None] | None:
        """Run a command in the reader, up to its first wait; the rest, if any, is returned.

        A handler that completes without waiting is the fast path: no task switch between
        the read and its reply, no coroutine but the handler's, and no bookkeeping (nothing
        else runs meanwhile, so nothing could see it). One that waits is counted in the
        link's load from then on and *adopted*: a stand-in goes through the queue, so the
        policy orders later commands after it (SpecOrder runs none before it is done,
        KeyedOrder keys it, ConcurrentOrder counts it in its limit).
        """
        state.dispatched += 1
        try:
            self.core.admit(frame.header)
            result: Any = self._handler(frame)
            if type(result) is bytes:
                # The common case (a packed reply at once): no more calls than it needs. The
                # reader's link has no hooks (else nothing runs inline) and nothing queued.
                reply = self.core.reply_header(frame.header, len(result), 0)
                if reply is not None:
                    try:  # noqa: SIM105 (once per command: cheaper than suppress())
                        state.transport.write_bytes(reply, result)
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        pass  # the reader sees the closed transport next
                if frame.fds:
                    frame.close_fds()
                return None
            coro = _pending(result)
            if coro is not None:
                try:
                    trap = coro.send(None)
                except StopIteration as done:
                    result = done.value
                else:
                    commands = state.commands
                    held_fds = len(frame.fds)
                    commands.hold(frame)
                    state.adopted_done = trio.Event()
                    commands.adopt(Frame(frame.header, frame.payload, []))
                    return self._finish_inline(state, frame, held_fds, _Suspended(coro, trap))
            reply, payload, fds, transfer = self._reply(frame, result)
            if reply is not None:
                self._send_reply(state, reply, payload, fds, transfer)
        except Exception as exc:
            error = self._error_reply(frame, exc)
            if error is not None:
                self._send_reply(state, error)
        except BaseException:
            frame.close_fds()
            raise
        if frame.fds:
            frame.close_fds()
        return None

    async def _finish_inline(
        self, state: LinkState, frame: Frame, held_fds: int, rest: _Suspended
    ) -> None:
        """The rest of an inline command that had to wait, and its answer."""
        try:
            try:
                result = await rest
            except Exception as exc:
                error = self._error_reply(frame, exc)
                if error is not None:
                    self._send_reply(state, error)
                return
            reply, payload, fds, transfer = self._reply(frame, result)
            if reply is not None:
                self._send_reply(state, reply, payload, fds, transfer)
        finally:
            if frame.fds:
                frame.close_fds()
            state.commands.release(frame, held_fds)
            done = state.adopted_done
            if done is not None:
                state.adopted_done = None
                done.set()

    # ----------------------------------------------------------------- sending

    def _send(
        self,
        state: LinkState,
        header: bytes,
        payload: Buffer | Pieces = b"",
        fds: Sequence[int] = (),
        transfer_fds: bool = False,
        *,
        flush: bool = True,
    ) -> None:
        """Queue a frame (its header packed) on a link, through the hooks if any. Raises trio
        resource errors."""
        if self._hooks is None:
            state.transport.write(header, payload, fds, transfer_fds=transfer_fds, flush=flush)
            return
        if fds and not transfer_fds:
            fds = [os.dup(fd) for fd in fds]
        data = b"".join(payload) if isinstance(payload, tuple) else bytes(payload)
        frame = Frame(Header.unpack(header), data, list(fds))
        self._hooks.on_send(self, state.link, frame, partial(self._forward_out, state))

    @staticmethod
    def _forward_out(state: LinkState, frame: Frame) -> None:
        fds = frame.take_fds()
        # If the connection is closing, write() closes the fds and the frame is lost.
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            state.transport.write(frame.header, frame.payload, fds, transfer_fds=True)

    # ----------------------------------------------------------------- dispatch

    async def _process(
        self, state: LinkState, frame: Frame, release: ReleaseGate | None = None
    ) -> None:
        """Run one command through the handler and queue its reply (the policy's ``process``);
        with ``release``, the reply waits until it returns (``PolicyContext.execute``).

        The command counts in the link's load until it is done, whether it waits in the
        queue or in a policy of its own (KeyedOrder's lanes, ConcurrentOrder's tasks).
        """
        if frame is state.commands.adopted:
            # The stand-in of an inline command, which runs in the former reader's task.
            try:
                if state.adopted_done is not None:
                    await state.adopted_done.wait()
            finally:
                state.commands.drop_stand_in()
            return
        held_fds = len(frame.fds)
        try:
            core = self.core
            if state.dispatched >= core.cut_check and core.cut_before(
                state.dispatched, frame.header
            ):
                # Let the rest of the process run (the writer sends the replies queued so far).
                state.dispatched = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
            state.dispatched += 1
            limit = core.max_send_backlog
            if limit is not None and state.transport.backlog >= limit:
                try:
                    while state.transport.backlog >= limit // 2:
                        await state.wait()
                except BaseException:
                    frame.close_fds()
                    raise
            await self._run_command(state, frame, release)
        finally:
            state.commands.release(frame, held_fds)

    async def _run_command(
        self, state: LinkState, frame: Frame, release: ReleaseGate | None = None
    ) -> None:
        """Run one command through the handler and queue its answer, after ``release`` if
        given (the policy's gate); the reader's inline path is :meth:`_run_inline`."""
        try:
            try:
                self.core.admit(frame.header)
                result: Any = self._handler(frame)  # the result, or an awaitable of it
                coro = _pending(result)
                if coro is not None:
                    result = await coro
            except Exception as exc:
                error = self._error_reply(frame, exc)
                if error is not None:
                    if release is not None:
                        await release()
                    self._send_reply(state, error)
                return
            reply, payload, fds, transfer = self._reply(frame, result)
            if reply is None:
                return
            if release is not None:
                if isinstance(payload, tuple):
                    # The reply waits for the policy: its pieces (views of memory the handler
                    # lent) are copied now, so they hold what the handler read.
                    payload = b"".join(payload)
                try:
                    await release()
                except BaseException:
                    if transfer:
                        close_fds(fds)
                    raise
            self._send_reply(state, reply, payload, fds, transfer)
        finally:
            if frame.fds:
                frame.close_fds()

    def _reply(
        self, frame: Frame, result: HandlerResult
    ) -> tuple[bytes | None, Buffer | Pieces, Sequence[int], bool]:
        """The answer to a command whose handler returned ``result``: (packed header,
        payload, fds, whether we own them), an error reply if it cannot be sent (too many
        fds), no header for No_reply (then any fds we owned are closed)."""
        fds: Sequence[int] = ()
        transfer = False
        try:
            if type(result) is bytes:  # the common case (a packed reply): no more calls
                payload: Buffer | Pieces = result
                size = len(result)
            else:
                payload, size, fds, transfer = _reply_body(result)
            reply = self.core.reply_header(frame.header, size, len(fds))
        except Exception as exc:
            if transfer:
                close_fds(fds)
            return self._error_reply(frame, exc), b"", (), False
        if reply is None and transfer:
            close_fds(fds)  # No_reply: never answered
        return reply, payload, fds, transfer

    def _error_reply(self, frame: Frame, exc: Exception) -> bytes | None:
        """Log why a command failed; its error reply (None for No_reply)."""
        header = frame.header
        if isinstance(exc, ReplyTooManyFds):
            log.error("%s: %s", self.name, exc)  # our bug, not a traceback
        elif isinstance(exc, VfioUserError):
            log.debug("command %d failed: %s", header.command, exc)
        else:
            log.exception("handler of command %d raised", header.command)
        return self.core.error_reply_header(header, exc)

    def _send_reply(
        self,
        state: LinkState,
        header: bytes,
        payload: Buffer | Pieces = b"",
        fds: Sequence[int] = (),
        transfer_fds: bool = False,
    ) -> None:
        # While more commands wait for the dispatcher, leave the reply queued: the last reply
        # of a batch (or the writer task, if a handler blocks) sends them all in one sendmsg.
        # (The reader's inline replies are corked instead: see _read_loop.)
        # A closed socket is noticed by the reader, which shuts the connection down.
        # (try/except rather than contextlib.suppress: this runs once per command.)
        try:
            if self._hooks is None:
                flush = not state.commands.has_pending()
                state.transport.write(header, payload, fds, transfer_fds=transfer_fds, flush=flush)
            else:
                self._send(state, header, payload, fds, transfer_fds)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # ----------------------------------------------------------------- requests

    async def request(self, msg: Request, *, transfer_fds: bool = False) -> Message:
        """Send a command and return its decoded reply (``msg.parse_reply``).

        Raises VfioUserError for an error reply, ProtocolError for a malformed reply and
        ConnectionClosedError when the connection ends. ``transfer_fds`` moves ownership of
        ``msg.fds`` to the engine.
        """
        frame = await self.request_raw(msg.COMMAND, msg.pack(), msg.fds, transfer_fds=transfer_fds)
        fds = frame.take_fds()
        try:
            return msg.parse_reply(frame.payload, fds)
        except BaseException:
            close_fds(fds)
            raise

    async def request_raw(
        self,
        command: int,
        payload: Buffer | Pieces = b"",
        fds: Sequence[int] = (),
        *,
        transfer_fds: bool = False,
    ) -> Frame:
        """Send a command given as bytes (or ``Pieces``, sent as iovecs: see ``RawMessage``);
        return the reply frame (the caller owns its fds).

        Same errors as :meth:`request`; an error reply raises instead of being returned.
        """
        # start_request_raw and PendingReply.wait without the PendingReply: once per
        # request (a device's message DMA is all requests).
        state, msg_id, request = await self._start_request(command, payload, fds, transfer_fds)
        try:
            await self._await_reply(state, request.done)
        except BaseException:
            _cancel_request(self.core, msg_id, request)
            raise
        return request.result(self.core, command)

    async def start_request_raw(
        self,
        command: int,
        payload: Buffer | Pieces = b"",
        fds: Sequence[int] = (),
        *,
        transfer_fds: bool = False,
    ) -> PendingReply:
        """Send a command now; returns once it is queued, without waiting for the reply.

        ``await pending.wait()`` later gives the reply frame (errors as :meth:`request_raw`),
        so one task can pipeline requests in the order it chooses. Wait for every pending
        reply or :meth:`~PendingReply.cancel` it: until then its ID stays in use.
        """
        state, msg_id, request = await self._start_request(command, payload, fds, transfer_fds)
        return PendingReply(self, state, msg_id, command, request)

    async def _start_request(
        self, command: int, payload: Buffer | Pieces, fds: Sequence[int], transfer_fds: bool
    ) -> tuple[LinkState, int, _PendingRequest]:
        """Send a command expecting a reply: its link, message ID and the reply's waiter."""
        core = self.core
        state, msg_id, header, payload = await self._begin_request(
            command, payload, fds, transfer_fds, no_reply=False
        )
        request = _PendingRequest()
        core.expect_reply(msg_id, command, request, state)
        if not self._reply_clock and self._reply_timeout is not None:
            self._start_reply_clock(self._reply_timeout)
        state.wake()  # a paused reader must read this request's reply
        try:
            self._send_request(state, command, header, payload, fds, transfer_fds)
        except BaseException:
            core.forget(msg_id)
            raise
        return state, msg_id, request

    def _start_reply_clock(self, timeout: float) -> None:
        if self._nursery is not None:
            self._reply_clock = True
            self._nursery.start_soon(self._run_reply_clock, timeout)

    async def _run_reply_clock(self, timeout: float) -> None:
        """Check the core's reply clock while requests wait; close the connection with
        ReplyTimeout at the first one overdue (module doc). Ends once none waits."""
        core = self.core
        try:
            while True:
                await trio.sleep(timeout / REPLY_CHECKS)
                late = core.overdue()
                if late is not None:
                    reason = ReplyTimeout(*late, timeout)
                    log.warning("%s: closing: %s", self.name, reason)
                    self._shutdown(reason, "the peer stopped answering")
                    return
                if not core.awaiting_replies:
                    return
        finally:
            self._reply_clock = False

    async def post_raw(
        self,
        command: int,
        payload: Buffer | Pieces = b"",
        fds: Sequence[int] = (),
        *,
        transfer_fds: bool = False,
    ) -> None:
        """Send a command with No_reply set; returns once it is queued (errors as
        :meth:`request`, except that no reply is awaited)."""
        state, _, header, payload = await self._begin_request(
            command, payload, fds, transfer_fds, no_reply=True
        )
        self._send_request(state, command, header, payload, fds, transfer_fds)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _begin_request(
        self,
        command: int,
        payload: Buffer | Pieces,
        fds: Sequence[int],
        transfer_fds: bool,
        *,
        no_reply: bool,
    ) -> tuple[LinkState, int, bytes, Buffer | Pieces]:
        """Checks and waits before a request is queued; its link, message ID, header and
        payload. Closes transferred fds if it raises."""
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            core = self.core
            core.check_request(command, len(fds))
            state = self._request_link
            if state.transport.queued_bytes > SEND_HIGH_WATER:
                try:
                    await state.transport.wait_send_capacity()
                except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                    raise ConnectionClosedError(errno=errno.ENOTCONN, command=command) from exc
            msg_id = core.allocate_id()
            while msg_id is None:
                if self._id_lot is None:
                    self._id_lot = trio.lowlevel.ParkingLot()
                await self._id_lot.park()
                core.check_request(command, len(fds))
                msg_id = core.allocate_id()
        except BaseException:
            if transfer_fds:
                close_fds(fds)
            raise
        payload, size = byte_pieces(payload)
        return state, msg_id, core.command_header(msg_id, command, size, no_reply), payload

    def _send_request(
        self,
        state: LinkState,
        command: int,
        header: bytes,
        payload: Buffer | Pieces,
        fds: Sequence[int],
        transfer_fds: bool,
    ) -> None:
        try:
            self._send(state, header, payload, fds, transfer_fds)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ConnectionClosedError(errno=errno.ENOTCONN, command=command) from exc


class PendingReply:
    """A request sent by :meth:`Connection.start_request_raw`, its reply still to come."""

    __slots__ = ("_command", "_conn", "_core", "_link", "_msg_id", "_request")

    def __init__(
        self,
        conn: Connection,
        link: LinkState,
        msg_id: int,
        command: int,
        request: _PendingRequest,
    ) -> None:
        self._conn = conn
        self._core = conn.core
        self._link = link
        self._msg_id = msg_id
        self._command = command
        self._request: _PendingRequest | None = request

    @property
    def msg_id(self) -> int:
        return self._msg_id

    @property
    def command(self) -> int:
        return self._command

    @property
    def done(self) -> bool:
        """True once the reply (or the connection's end) has come."""
        return self._request is None or self._request.done.is_set()

    async def wait(self) -> Frame:
        """The reply frame (the caller owns its fds); raises as :meth:`Connection.request_raw`.
        Once only: the reply is the caller's from then on."""
        request = self._request
        if request is None:
            raise RuntimeError("this reply was already taken or cancelled")
        try:
            await self._conn._await_reply(self._link, request.done)
        except BaseException:
            self.cancel()
            raise
        self._request = None
        return request.result(self._core, self._command)

    def cancel(self) -> None:
        """Give up the reply: a reply already here is closed, a late one consumed when it
        comes (its ID stays reserved until then)."""
        request, self._request = self._request, None
        if request is not None:
            _cancel_request(self._core, self._msg_id, request)


def _cancel_request(
    core: ConnectionCore[_PendingRequest], msg_id: int, request: _PendingRequest
) -> None:
    """Give up the reply to ``msg_id``: one already here is closed, a late one consumed when
    it comes (its ID stays reserved until then)."""
    if not core.cancel(msg_id, request) and request.frame is not None:
        request.frame.close_fds()


class _Suspended:
    """The rest of a coroutine whose first step ran already and yielded ``trap``.

    Awaiting it passes ``trap`` on to trio and drives the coroutine to its end, exactly as
    awaiting the coroutine would have done after that first step: it returns what the
    coroutine returns and raises what it raises. The task that awaits it must be the one
    that ran the first step (trio's traps belong to the task).
    """

    __slots__ = ("_coro", "_trap")

    def __init__(self, coro: Coroutine[Any, Any, HandlerResult], trap: object) -> None:
        self._coro = coro
        self._trap = trap

    def __await__(self) -> Generator[Any, Any, HandlerResult]:
        coro, trap = self._coro, self._trap
        while True:
            try:
                sent = yield trap
            except BaseException as exc:
                try:
                    trap = coro.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    trap = coro.send(sent)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]


#: How many connections run in each trio run (``Connection._run``): a reader alone there skips
#: the fairness cut (``ConnectionCore.cut_before``). One list per run, so it needs no reset.
_CONNECTIONS: trio.lowlevel.RunVar[list[int]] = trio.lowlevel.RunVar("vfiouser_trio.connections")


def _uncork(transport: Transport) -> None:
    """``transport.uncork()``; a failed send closed the transport, which the reader's next
    receive reports (as for a reply, see ``_send_reply``)."""
    with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        transport.uncork()


def _pending(result: object) -> Coroutine[Any, Any, HandlerResult] | None:
    """What a handler returned, as the coroutine still to run; None when it is the result
    itself (answered at once: nothing to step or await)."""
    if type(result) is CoroutineType:
        return result
    # (The results a handler may give, tested first: isawaitable goes through an ABC check.)
    if result is None or isinstance(result, _ANSWERS) or not isawaitable(result):
        return None
    return _awaited(result)


#: The types of a handler's answer itself (HandlerResult but None).
_ANSWERS = (bytes, Message, RawMessage)


async def _awaited(awaitable: Awaitable[HandlerResult]) -> HandlerResult:
    """A handler's awaitable that is not a coroutine, as one (the inline path steps it)."""
    return await awaitable


def _reply_body(result: HandlerResult) -> tuple[Buffer | Pieces, int, Sequence[int], bool]:
    """A handler's result as (payload, its size, fds, whether the engine owns the fds)."""
    if result is None:
        return b"", 0, (), False
    if isinstance(result, bytes):
        return result, len(result), (), False
    if isinstance(result, RawMessage):
        return *byte_pieces(result.payload), result.fds, result.transfer_fds
    payload = result.pack()
    return payload, len(payload), result.fds, False


def open_connection(
    sock: socket.socket,
    *,
    handler: Handler,
    policy: OrderingPolicy | None = None,
    hooks: ConnectionHooks | None = None,
    role: Role = Role.PEER,
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
    max_recv_fds: int = DEFAULT_MAX_MSG_FDS,
    max_send_fds: int = DEFAULT_MAX_MSG_FDS,
    max_send_backlog: int | None = None,
    dispatch_batch: int = DEFAULT_DISPATCH_BATCH,
    reply_timeout: float | None = None,
    name: str = "vfio-user",
) -> AbstractAsyncContextManager[Connection]:
    """Run a connection over ``sock`` (which it takes ownership of) for the ``async with`` body.

    ``role=Role.SERVER`` makes VERSION the first command (refusing anything else before it);
    ``max_send_backlog`` bounds the memory held for the peer (None: unbounded) and
    ``dispatch_batch`` how many commands run before the dispatcher yields, and
    ``reply_timeout`` how long the peer may leave a request unanswered before the connection
    closes (None: for ever; module doc).

    The engine's tasks run in a nursery of their own; when the peer disconnects the
    connection closes (``conn.closed`` is set) but the body is not cancelled. Leaving the body
    closes the connection and everything it owns; an exception from the body propagates
    unchanged (not wrapped in an ExceptionGroup).
    """
    return _Running(
        partial(
            Connection,
            sock,
            handler=handler,
            policy=policy,
            hooks=hooks,
            role=role,
            max_msg_size=max_msg_size,
            max_recv_fds=max_recv_fds,
            max_send_fds=max_send_fds,
            max_send_backlog=max_send_backlog,
            dispatch_batch=dispatch_batch,
            reply_timeout=reply_timeout,
            name=name,
        )
    )


class _Running:
    """The context manager of :func:`open_connection`: a class rather than a generator,
    since every open connection keeps it (a suspended generator costs a kilobyte or two)."""

    __slots__ = ("_conn", "_make", "_nursery")

    def __init__(self, make: Callable[[], Connection]) -> None:
        self._make: Callable[[], Connection] | None = make
        self._conn: Connection | None = None
        self._nursery: AbstractAsyncContextManager[trio.Nursery] | None = None

    async def __aenter__(self) -> Connection:
        make = self._make
        assert make is not None, "open_connection() is entered once"
        self._make = None
        conn = make()  # closes the socket if it raises
        manager = trio.open_nursery()
        nursery = await manager.__aenter__()
        try:
            await nursery.start(conn._run)
        except BaseException:
            conn.close()
            await manager.__aexit__(None, None, None)
            raise
        self._conn, self._nursery = conn, manager
        assert conn._run_task is not None
        trio.lowlevel.reschedule(conn._run_task)  # start reading
        return conn

    async def __aexit__(self, *exc_info: object) -> None:
        # The body's exception (if any) is not passed into the nursery: it propagates as it
        # is rather than wrapped in an ExceptionGroup.
        conn, manager = self._conn, self._nursery
        assert conn is not None and manager is not None
        conn.close()
        await manager.__aexit__(None, None, None)
