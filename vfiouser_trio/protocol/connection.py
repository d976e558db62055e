"""The rules of one vfio-user connection, without I/O (sans-io, as h11 is for HTTP).

:class:`ConnectionCore` is a synchronous state object. Its input is what the framing layer
(:mod:`.framing`) cut from the stream, its output is what to do about it; the trio engine
(:mod:`vfiouser_trio.engine`) moves the bytes, fds and wake-ups and runs the handlers. It owns:

* message IDs of our requests and the table of requests awaiting a reply, keyed by ID; a
  reply is matched by ID and must name the request's command, and must come on the link
  (socket) its request went on: a reply on the other socket of a twin-socket connection
  closes the connection (spec: "twin_socket" carries server-to-client commands *and their
  replies*; the requester may be waiting on that socket alone);
* the reply clock: :meth:`ConnectionCore.overdue`, called every ``timeout / REPLY_CHECKS``
  seconds while requests wait, names a request that has waited through more than
  ``REPLY_CHECKS`` checks (at least ``timeout``, less than ``1.25 * timeout``), for the
  engine to close the connection with (``ReplyTimeout``): the peer stopped answering;
* the reserved IDs of cancelled requests: the late reply is consumed silently, and the ID is
  not handed out again until it has come (or the connection ends);
* which received message gets which answer (spec: https://www.qemu.org/docs/master/interop/vfio-user.html,
  "Header" and "Error handling"; EINVAL where we choose):

  - a command carrying more fds than ``max_recv_fds``, or a message that is neither command
    nor reply, is answered EINVAL (its fds closed);
  - a message over ``max_msg_size`` (skipped by the decoder) is answered EINVAL when it is a
    command, and fails its request with EMSGSIZE when it is a reply;
  - ``msg_size`` below the header size answers EINVAL (when it is a command) and closes the
    connection: the stream cannot be followed;
  - a reply that answers no request is dropped with a warning (answering it would look like
    a reply to one of the peer's requests);
  - a No_reply command is never answered, not even with an error;
  - an error reply with errno 0 is EIO to the requester;
* VERSION first, with ``Role.SERVER``: a command before a successful VERSION, or a second
  VERSION, is refused with EINVAL (spec: "Version"); the client's half of negotiation is
  :func:`~vfiouser_trio.protocol.version.check_server_reply`;
* the per-connection limits: ``max_msg_size`` and ``max_recv_fds`` for what we accept,
  ``max_send_fds`` for what we send, ``max_send_backlog`` and ``dispatch_batch`` for how much
  a link may hold for its peer before it stops reading (:meth:`ConnectionCore.read_action`);
* when a link yields to the rest of the process between commands (:meth:`ConnectionCore.cut_before`:
  every ``dispatch_batch`` commands while other connections share the process, or where a
  ``cut_hook`` says).

Requests carry an opaque *waiter* (the engine's object to wake), returned in the events.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from .constants import (
    DEFAULT_MAX_MSG_FDS,
    FLAG_NO_REPLY,
    FLAG_TYPE_COMMAND,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
    Command,
)
from .errors import ProtocolError, VfioUserError, command_name
from .framing import DEFAULT_MAX_MSG_SIZE, BrokenStream, Frame, OversizedFrame, StrayFds
from .header import HEADER_STRUCT, Header, command_header, error_header

__all__ = [
    "DEFAULT_DISPATCH_BATCH",
    "DISPATCH",
    "FRAME_OVERHEAD",
    "MSG_ID_SPACE",
    "REPLY_CHECKS",
    "Close",
    "ConnectionClosedError",
    "ConnectionCore",
    "Dispatch",
    "Ignore",
    "ReadAction",
    "ReplyArrived",
    "ReplyTimeout",
    "ReplyTooManyFds",
    "RequestFailed",
    "Role",
    "SendError",
]

W = TypeVar("W")

#: Message IDs are 16 bits: at most this many requests (awaiting or reserved) at once.
MSG_ID_SPACE: Final = 1 << 16
#: What a received command costs in memory beyond its payload (frame, header and bytes
#: objects, queue slot), for the load a link counts against ``max_send_backlog``.
FRAME_OVERHEAD: Final = 256
#: Commands a link runs before it yields to the scheduler, unless told otherwise.
DEFAULT_DISPATCH_BATCH: Final = 8
#: Checks of the reply clock (:meth:`ConnectionCore.overdue`) per reply timeout.
REPLY_CHECKS: Final = 4
_VERSION: Final = int(Command.VERSION)
_pack_header = HEADER_STRUCT.pack


class ConnectionClosedError(VfioUserError):
    """The connection is gone.

    ``errno`` is ECONNRESET for a request that was pending when the connection ended (peer
    disconnect, fatal protocol error or local close) and ENOTCONN for one made afterwards.
    """

    def __init__(
        self, message: str = "", *, errno: int = errno.ECONNRESET, command: int | None = None
    ) -> None:
        super().__init__(errno, message or "vfio-user connection closed", command=command)


class ReplyTooManyFds(VfioUserError):
    """Our reply would carry more fds than the peer accepts: EINVAL is sent instead."""


# OSError types errno as optional; ours always has one (ETIMEDOUT).
class ReplyTimeout(ProtocolError, TimeoutError):  # type: ignore[misc]
    """The peer left one of our requests unanswered past the connection's reply timeout:
    the reason the engine closed the connection. A ProtocolError with errno ETIMEDOUT, and
    a TimeoutError."""

    def __init__(self, msg_id: int, command: int, timeout: float) -> None:
        super().__init__(
            f"no reply to {command_name(command)} (id {msg_id}) within {timeout:g} s",
            errno=errno.ETIMEDOUT,
            command=command,
        )


class Role(enum.Enum):
    """Which rules about VERSION the core enforces on received commands."""

    #: A server: VERSION first, and only once successfully.
    SERVER = "server"
    #: No VERSION rule (a client, whose negotiation is its first request; a bare engine).
    PEER = "peer"


class ReadAction(enum.Enum):
    """What a link's reader does next, given its load (:meth:`ConnectionCore.read_action`)."""

    READ = "read"
    PAUSE = "pause"
    CLOSE = "close"


# ------------------------------------------------------------------------- events


class Dispatch:
    """Run the received command (the frame given to :meth:`ConnectionCore.receive`)."""

    __slots__ = ()


#: The one :class:`Dispatch` event (it carries nothing: the caller holds the frame).
DISPATCH: Final = Dispatch()


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build
class ReplyArrived(Generic[W]):
    """``frame`` answers the request ``waiter`` was registered for; the waiter owns its fds."""

    waiter: W
    frame: Frame


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build
class RequestFailed(Generic[W]):
    """The request of ``waiter`` fails with ``error`` (its reply's fds are closed)."""

    waiter: W
    error: VfioUserError


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build
class SendError:
    """Answer message ``msg_id`` (command ``command``) with an error; ``why`` for the log."""

    msg_id: int
    command: int
    errno: int
    why: str

    def header(self) -> bytes:
        return error_header(self.msg_id, self.command, self.errno).pack()


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build
class Ignore:
    """Nothing to send (any fds are closed); ``why``, if set, is worth a WARNING."""

    why: str | None = None


_IGNORE: Final = Ignore()


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build
class Close:
    """The stream cannot go on: send ``answer`` if any, then close with ``reason``."""

    reason: ProtocolError
    answer: SendError | None


Event = Dispatch | ReplyArrived[W] | RequestFailed[W] | SendError | Ignore | Close


class ConnectionCore(Generic[W]):
    """One connection's protocol state; see the module doc for the rules it owns."""

    __slots__ = (
        "_closed",
        "_cut_hook",
        "_max_msg_size",
        "_max_recv_fds",
        "_negotiated",
        "_next_id",
        "_orphans",
        "_overdue_ages",
        "_pending",
        "_version_rule",
        "cut_check",
        "dispatch_batch",
        "max_send_backlog",
        "max_send_fds",
    )

    def __init__(
        self,
        *,
        role: Role = Role.PEER,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        max_recv_fds: int = DEFAULT_MAX_MSG_FDS,
        max_send_fds: int = DEFAULT_MAX_MSG_FDS,
        max_send_backlog: int | None = None,
        dispatch_batch: int = DEFAULT_DISPATCH_BATCH,
    ) -> None:
        if max_send_backlog is not None and max_send_backlog < 1:
            raise ValueError("max_send_backlog must be positive (or None: unbounded)")
        if dispatch_batch < 1:
            raise ValueError("dispatch_batch must be at least 1")
        if max_recv_fds < 0 or max_send_fds < 0:
            raise ValueError("fd limits must not be negative")
        self._max_msg_size = max_msg_size
        self._max_recv_fds = max_recv_fds
        #: Most fds the peer accepts in one message (its ``max_msg_fds``, set after VERSION).
        self.max_send_fds = max_send_fds
        #: Bytes a link may hold for its peer before it stops reading (None: unbounded).
        self.max_send_backlog = max_send_backlog
        #: Commands a link starts before it yields to the rest of the process.
        self.dispatch_batch = dispatch_batch
        self._cut_hook: Callable[[int, Header], bool] | None = None
        #: The engine asks :meth:`cut_before` only once a link has started this many commands
        #: since it last yielded (``dispatch_batch``; 0 with a ``cut_hook``: before each one).
        self.cut_check = dispatch_batch
        self._version_rule = role is Role.SERVER
        self._negotiated = False
        #: msg_id -> (command, waiter, link the request went on).
        self._pending: dict[int, tuple[int, W, object]] = {}
        # IDs of cancelled requests whose late reply may still come; created when needed.
        self._orphans: set[int] | None = None
        self._next_id = 0
        self._closed = False
        # msg_id -> (waiter, checks of the reply clock it has been pending at); None until
        # a check finds a request waiting (an idle connection holds no dict for it).
        self._overdue_ages: dict[int, tuple[W, int]] | None = None

    # ----------------------------------------------------------------- state

    @property
    def max_msg_size(self) -> int:
        """Largest message (header included) accepted from the peer."""
        return self._max_msg_size

    @property
    def max_recv_fds(self) -> int:
        """Most fds accepted with one message (what this side advertised as max_msg_fds)."""
        return self._max_recv_fds

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def negotiated(self) -> bool:
        """True once a VERSION command was answered successfully (``Role.SERVER`` only)."""
        return self._negotiated

    @property
    def awaiting_replies(self) -> int:
        """Requests sent and awaiting their reply (not counting cancelled ones)."""
        return len(self._pending)

    def pending_requests(self) -> list[tuple[int, int]]:
        """(message ID, command) of every request awaiting its reply, for diagnostics."""
        return [(msg_id, entry[0]) for msg_id, entry in self._pending.items()]

    @property
    def reserved_ids(self) -> int:
        """IDs of cancelled requests whose late reply has not come yet."""
        return len(self._orphans) if self._orphans else 0

    @property
    def next_message_id(self) -> int:
        """The message ID the next request tries first (IDs in use are skipped)."""
        return self._next_id

    @next_message_id.setter
    def next_message_id(self, value: int) -> None:
        self._next_id = value & 0xFFFF

    def close(self) -> list[tuple[int, W]]:
        """The connection ended: returns (command, waiter) of every request awaiting a reply.

        Requests made afterwards fail with ENOTCONN; received frames are ignored.
        """
        self._closed = True
        pending = [(command, waiter) for command, waiter, _ in self._pending.values()]
        self._pending.clear()
        self._orphans = None
        return pending

    # ----------------------------------------------------------------- receiving

    def receive(self, frame: Frame, link: object = None) -> Event[W]:
        """Classify one received frame, which came on ``link``; the caller acts on the event.

        For :data:`DISPATCH` and :class:`ReplyArrived` the caller owns the frame's fds;
        for every other event they are closed.
        """
        header = frame.header
        kind = header.flags & FLAG_TYPE_MASK  # Header.is_reply / is_command, inlined
        if kind == FLAG_TYPE_REPLY:
            return self._on_reply(frame, link)
        if kind != FLAG_TYPE_COMMAND:
            return self._reject(frame, "unknown message type")
        if len(frame.fds) > self._max_recv_fds:
            return self._reject(frame, f"{len(frame.fds)} fds exceed the limit")
        if self._closed:
            frame.close_fds()
            return _IGNORE
        return DISPATCH

    def _on_reply(self, frame: Frame, link: object) -> Event[W]:
        header = frame.header
        msg_id = header.msg_id
        entry = self._pending.get(msg_id)
        if entry is not None:
            command, waiter, sent_on = entry
            if sent_on is not link:
                # Left pending: closing the connection fails it.
                frame.close_fds()
                reason = ProtocolError(
                    f"reply {msg_id} ({command_name(command)}) came on another socket than"
                    " its request",
                    command=command,
                )
                return Close(reason, None)
            del self._pending[msg_id]
            if header.command != command:
                frame.close_fds()
                error = ProtocolError(
                    f"reply {msg_id} is for {command_name(header.command)}", command=command
                )
                return RequestFailed(waiter, error)
            return ReplyArrived(waiter, frame)
        frame.close_fds()
        orphans = self._orphans
        if orphans and msg_id in orphans:
            orphans.discard(msg_id)  # the late reply of a cancelled request
            return _IGNORE
        return Ignore(
            f"dropped a reply (id {msg_id}, command {header.command}) that answers nothing"
        )

    @staticmethod
    def _reject(frame: Frame, why: str) -> SendError | Ignore:
        frame.close_fds()
        header = frame.header
        if header.no_reply:
            return _IGNORE
        return SendError(header.msg_id, header.command, errno.EINVAL, why)

    def receive_framing_error(self, event: OversizedFrame | StrayFds | BrokenStream) -> Event[W]:
        """Classify a decoder report (its fds are closed already)."""
        if isinstance(event, StrayFds):
            return Ignore(f"closed {event.count} fds sent outside any message")
        header = event.header
        if isinstance(event, BrokenStream):
            answer = None
            if header.is_command and not header.no_reply:
                answer = SendError(header.msg_id, header.command, errno.EINVAL, event.reason)
            return Close(ProtocolError(event.reason), answer)
        if header.is_reply:
            entry = self._pending.pop(header.msg_id, None)
            if self._orphans:
                self._orphans.discard(header.msg_id)
            if entry is None:
                return _IGNORE
            command, waiter, _ = entry
            error = ProtocolError(
                f"reply of {header.msg_size} bytes exceeds the limit of {self._max_msg_size}",
                errno=errno.EMSGSIZE,
                command=command,
            )
            return RequestFailed(waiter, error)
        if header.no_reply:
            return _IGNORE
        why = f"{header.msg_size} bytes exceed the limit of {self._max_msg_size}"
        return SendError(header.msg_id, header.command, errno.EINVAL, why)

    # ----------------------------------------------------------------- commands

    def admit(self, header: Header) -> None:
        """Check a command about to run: raises VfioUserError(EINVAL) if its turn is wrong."""
        if self._version_rule:
            if not self._negotiated:
                if header.command != _VERSION:
                    raise VfioUserError(errno.EINVAL, "VERSION must be the first message")
            elif header.command == _VERSION:
                raise VfioUserError(errno.EINVAL, "VERSION after negotiation")

    def reply_header(self, header: Header, payload_size: int, fd_count: int) -> bytes | None:
        """The packed header of the reply to a command whose handler succeeded; None for
        No_reply. Raises :class:`ReplyTooManyFds` beyond ``max_send_fds``."""
        if self._version_rule and header.command == _VERSION:
            self._negotiated = True
        if header.flags & FLAG_NO_REPLY:  # Header.no_reply, inlined: once per command
            return None
        if fd_count > self.max_send_fds:
            raise ReplyTooManyFds(
                errno.EINVAL,
                f"reply to command {header.command} carries {fd_count} fds,"
                f" the peer accepts {self.max_send_fds}",
            )
        return _pack_header(
            header.msg_id, header.command, HEADER_SIZE + payload_size, FLAG_TYPE_REPLY, 0
        )

    @staticmethod
    def error_reply_header(header: Header, exc: BaseException) -> bytes | None:
        """The packed error reply to a command whose handler raised ``exc``: its errno for a
        VfioUserError (ProtocolError included), EIO for anything else. None for No_reply."""
        if header.no_reply:
            return None
        code = exc.errno if isinstance(exc, VfioUserError) else errno.EIO
        return error_header(header.msg_id, header.command, code).pack()

    # ----------------------------------------------------------------- requests

    def check_request(self, command: int, fd_count: int) -> None:
        """Raises if a request cannot be sent: ENOTCONN once closed, too many fds."""
        if self._closed:
            raise ConnectionClosedError(errno=errno.ENOTCONN, command=command)
        if fd_count > self.max_send_fds:
            raise ProtocolError(
                f"{fd_count} fds exceed the peer's limit of {self.max_send_fds}", command=command
            )

    def allocate_id(self) -> int | None:
        """A message ID no request uses or reserves; None while all 65536 are taken."""
        busy = self._pending
        orphans = self._orphans or ()
        if len(busy) + len(orphans) >= MSG_ID_SPACE:
            return None
        msg_id = self._next_id
        while msg_id in busy or msg_id in orphans:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        return msg_id

    @staticmethod
    def command_header(msg_id: int, command: int, payload_size: int, no_reply: bool) -> bytes:
        """The packed header of our request."""
        return command_header(msg_id, command, payload_size, no_reply=no_reply).pack()

    def expect_reply(self, msg_id: int, command: int, waiter: W, link: object = None) -> None:
        """Register a request about to be sent on ``link``; its reply, which must come on
        that link (``receive``'s), will come back with ``waiter``."""
        if self._closed:
            raise ConnectionClosedError(errno=errno.ENOTCONN, command=command)
        self._pending[msg_id] = (command, waiter, link)

    def forget(self, msg_id: int) -> None:
        """The request registered under ``msg_id`` was never sent."""
        self._pending.pop(msg_id, None)

    def cancel(self, msg_id: int, waiter: W) -> bool:
        """Give up waiting for a sent request; its ID stays reserved until the late reply.

        Returns False when the reply (or a failure) was already delivered to ``waiter``.
        """
        entry = self._pending.get(msg_id)
        if entry is None or entry[1] is not waiter:
            return False
        del self._pending[msg_id]
        if self._orphans is None:
            self._orphans = set()
        self._orphans.add(msg_id)
        return True

    def overdue(self) -> tuple[int, int] | None:
        """One check of the reply clock: (message ID, command) of a request that has been
        awaiting its reply at more than :data:`REPLY_CHECKS` checks in a row, else None.

        The caller checks every ``timeout / REPLY_CHECKS`` seconds while requests wait, so
        the request named has waited at least ``timeout`` (and less than 1.25 times it).
        A cancelled request is no longer awaited, and its ID's next request starts afresh.
        """
        ages = self._overdue_ages or {}
        counted: dict[int, tuple[W, int]] = {}
        late: tuple[int, int] | None = None
        for msg_id, (command, waiter, _) in self._pending.items():
            seen = ages.get(msg_id)
            age = seen[1] + 1 if seen is not None and seen[0] is waiter else 1
            if age > REPLY_CHECKS and late is None:
                late = (msg_id, command)
            counted[msg_id] = (waiter, age)
        self._overdue_ages = counted or None
        return late

    @staticmethod
    def reply_result(frame: Frame, command: int) -> Frame:
        """``frame`` if it is a successful reply; raises VfioUserError for an error reply
        (EIO when it carries errno 0), after closing its fds."""
        header = frame.header
        if header.is_error:
            frame.close_fds()
            raise VfioUserError(header.error or errno.EIO, command=command)
        return frame

    # ----------------------------------------------------------------- batching

    @property
    def cut_hook(self) -> Callable[[int, Header], bool] | None:
        """Decides, before each command a link starts, whether it yields first: called with
        the number of commands the link started since it last yielded and the command's
        header. None (the default): every ``dispatch_batch`` commands. For tests and the
        explorer, which make each cut a choice."""
        return self._cut_hook

    @cut_hook.setter
    def cut_hook(self, hook: Callable[[int, Header], bool] | None) -> None:
        self._cut_hook = hook
        self.cut_check = self.dispatch_batch if hook is None else 0

    def cut_before(self, started: int, header: Header, *, alone: bool = False) -> bool:
        """Whether a link that started ``started`` commands since it last yielded yields to
        the rest of the process before it starts command ``header`` (so that one pipelining
        peer cannot starve the others). Asked once ``started`` reaches :attr:`cut_check`.

        ``alone``: the asking reader's connection is the only one in its process (its event
        loop): then there is no other peer to starve, and the read itself yields, a read's
        commands later (about ``FRAMES_PER_READ``), so it does not cut. A ``cut_hook`` decides
        regardless."""
        hook = self._cut_hook
        if hook is None:
            return started >= self.dispatch_batch and not alone
        return hook(started, header)

    # ----------------------------------------------------------------- bounded memory

    def pressure(self, load: int, fd_count: int) -> float:
        """How full a link is, 1.0 at the mark: its load in bytes against
        ``max_send_backlog``, or the fds its received commands hold against
        ``dispatch_batch * max_recv_fds``. 0.0 when unbounded."""
        limit = self.max_send_backlog
        if limit is None:
            return 0.0
        fd_limit = self.dispatch_batch * max(self._max_recv_fds, 1)
        return max(load / limit, fd_count / fd_limit)

    def read_action(self, pressure: float, *, paused: bool, awaited: bool) -> ReadAction:
        """Whether a link's reader reads, pauses or closes the connection.

        A link reads below the mark and pauses at it until it is below half (``paused``). A
        link that carries a request of ours awaiting its reply (``awaited``) cannot pause: the
        reply may be behind the commands; it keeps reading until twice the mark, then closes.
        """
        if pressure < (0.5 if paused else 1.0):
            return ReadAction.READ
        if awaited:
            return ReadAction.READ if pressure < 2.0 else ReadAction.CLOSE
        return ReadAction.PAUSE

    def read_budget(self, load: int, min_read: int) -> int:
        """Bytes a bounded link may read so that even tiny commands (each costing
        ``FRAME_OVERHEAD``) cannot take its load far past the mark; at least ``min_read``."""
        limit = self.max_send_backlog
        assert limit is not None
        room = max(limit - load, 0) * HEADER_SIZE // (FRAME_OVERHEAD + HEADER_SIZE)
        return max(room, min_read)
