"""The checker's side of a connection: raw frames in and out, and a record of both.

The checker must be able to send what no correct client sends (short headers, bad flags,
reused IDs, truncated payloads), so it speaks frames rather than typed requests; the
project's ``Transport`` does the socket work and ``protocol/`` packs and decodes payloads.
Every frame that crosses is recorded in :attr:`Wire.log`, so a failure can say what was
sent and what came back.

Commands the server sends (DMA_READ / DMA_WRITE for maps made without an fd) are handed to
:attr:`Wire.on_server_command`; by default they are answered with EFAULT (the checker has
no memory behind such a map unless a check gives it some).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from ...protocol.capabilities import Capabilities
from ...protocol.constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_COMMAND,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
)
from ...protocol.errors import command_name
from ...protocol.framing import BrokenStream, Frame, OversizedFrame, max_msg_size_for
from ...protocol.header import Header, error_header
from ...protocol.version import Negotiated, VersionReply, VersionRequest, check_server_reply
from ...transport import Transport
from .model import Violation

#: Bytes of a payload shown in a report before it is cut short.
SHOWN_BYTES = 48
#: The checker accepts messages up to this size (1 GiB transfers are the bound of
#: ``max_data_xfer_size``; checks never ask for more than a few pages).
CHECKER_MAX_MSG = max_msg_size_for(16 << 20)
#: fds the checker accepts with one message (a VERSION reply's twin socket, IO fds).
CHECKER_MAX_FDS = 64
#: What the checker proposes unless a check says otherwise: the spec's defaults, but room
#: for 16 fds in a message as QEMU proposes (libvfio-user refuses GET_REGION_INFO of a
#: region with more sparse mmap areas than the client takes fds: ENOSPC).
CHECKER_CAPABILITIES = Capabilities(max_msg_fds=16)


class NoMoreConnections(Exception):
    """The target can give no further connection (``--fd`` names one socket)."""


class Target(Protocol):
    """Where the server under test is: something that opens a fresh connection to it."""

    #: Shown in reports: the socket path, ``fd 3``...
    label: str

    async def open(self) -> socket.socket:
        """A new connected AF_UNIX stream socket to the server."""
        ...


class PathTarget:
    """A server listening on a UNIX socket path."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.label = self.path

    async def open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            try:
                sock.connect(self.path)
            except BlockingIOError:  # the listener's backlog is full: wait for room
                await trio.lowlevel.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code), self.path) from None
            await trio.lowlevel.checkpoint()
        except BaseException:
            sock.close()
            raise
        return sock


class FdTarget:
    """One connected socket inherited as an fd: a single connection, handed out once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.label = f"fd {fd}"
        self._used = False

    async def open(self) -> socket.socket:
        await trio.lowlevel.checkpoint()
        if self._used:
            raise NoMoreConnections("needs a connection of its own, and --fd gives one")
        self._used = True
        return socket.socket(fileno=self.fd)


class FactoryTarget:
    """Connections from an async factory (e.g. a test's own server)."""

    def __init__(self, factory: Callable[[], Awaitable[socket.socket]], label: str) -> None:
        self._factory = factory
        self.label = label

    async def open(self) -> socket.socket:
        return await self._factory()


def hexdump(data: bytes, limit: int = SHOWN_BYTES) -> str:
    """``01 00 ...`` for at most ``limit`` bytes, then how many more there were."""
    shown = data[:limit].hex(" ")
    more = len(data) - limit
    return f"{shown} (+{more} bytes)" if more > 0 else shown or "(no payload)"


def describe_header(header: Header) -> str:
    kind = {FLAG_TYPE_COMMAND: "command", FLAG_TYPE_REPLY: "reply"}.get(
        header.flags & FLAG_TYPE_MASK, f"type {header.flags & FLAG_TYPE_MASK}"
    )
    extra = []
    if header.flags & FLAG_NO_REPLY:
        extra.append("No_reply")
    if header.flags & FLAG_ERROR:
        extra.append(f"Error errno={_errno.errorcode.get(header.error, header.error)}")
    flags = f" [{', '.join(extra)}]" if extra else ""
    return f"{command_name(header.command)} {kind} id={header.msg_id} size={header.msg_size}{flags}"


def describe(frame: Frame | None) -> str:
    """One frame as a report shows it (None: the connection closed)."""
    if frame is None:
        return "the connection closed"
    return f"{describe_header(frame.header)}: {hexdump(bytes(frame.payload))}"


ServerCommandHandler = Callable[["Wire", Frame], Awaitable[None]]


async def refuse_server_command(wire: Wire, frame: Frame) -> None:
    """Default answer to the server's DMA_READ/WRITE: EFAULT (no memory behind the map)."""
    frame.close_fds()
    if not frame.header.no_reply:
        await wire.send_header(
            error_header(frame.header.msg_id, frame.header.command, _errno.EFAULT)
        )


class Wire:
    """One connection to the server under test, frame by frame."""

    def __init__(self, sock: socket.socket) -> None:
        self.transport = Transport(sock, max_msg_size=CHECKER_MAX_MSG, max_recv_fds=CHECKER_MAX_FDS)
        self._events: deque[Frame | OversizedFrame | BrokenStream] = deque()
        self._eof = False
        self._next_id = 1
        #: What crossed, oldest first: ``→ ...`` sent, ``← ...`` received.
        self.log: list[str] = []
        #: The outcome of :meth:`negotiate`, once done.
        self.negotiated: Negotiated | None = None
        self.on_server_command: ServerCommandHandler = refuse_server_command
        #: Server commands (DMA_READ/WRITE) seen, in order.
        self.server_commands: list[Frame] = []

    @property
    def closed(self) -> bool:
        """True once the server has hung up (or we closed)."""
        return self._eof or self.transport.closed

    def new_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        return msg_id

    # ----------------------------------------------------------------- sending

    async def send_header(
        self, header: Header, payload: bytes = b"", fds: Sequence[int] = ()
    ) -> None:
        """Send one frame as given (``msg_size`` is not corrected: it may be a lie)."""
        self.log.append(f"→ {describe_header(header)}: {hexdump(payload)}")
        try:
            await self.transport.send(header, payload, fds)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._eof = True

    async def send_bytes(self, data: bytes) -> None:
        """Send raw bytes (a header cut short, garbage)."""
        self.log.append(f"→ raw {hexdump(data)}")
        try:
            await self.transport.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._eof = True

    async def send(
        self,
        command: int,
        payload: bytes = b"",
        *,
        msg_id: int | None = None,
        flags: int = FLAG_TYPE_COMMAND,
        no_reply: bool = False,
        fds: Sequence[int] = (),
    ) -> Header:
        """Send a command (``flags`` may name any type); returns the header sent."""
        if msg_id is None:
            msg_id = self.new_id()
        if no_reply:
            flags |= FLAG_NO_REPLY
        header = Header(msg_id, command, HEADER_SIZE + len(payload), flags, 0)
        await self.send_header(header, payload, fds)
        return header

    # ----------------------------------------------------------------- receiving

    async def next_frame(self) -> Frame | None:
        """The next reply from the server, or None once it has hung up.

        Server commands met on the way are recorded and handed to ``on_server_command``.
        An oversized or broken frame from the server ends the connection (None).
        """
        while True:
            if not self._events:
                if self.closed:
                    return None
                try:
                    events = await self.transport.receive()
                except Exception:
                    events = []
                if not events:
                    self._eof = True
                    self.log.append("← the connection closed")
                    return None
                for event in events:
                    if isinstance(event, (Frame, OversizedFrame, BrokenStream)):
                        self._events.append(event)
                continue
            event = self._events.popleft()
            if not isinstance(event, Frame):
                self.log.append(f"← unreadable frame: {event}")
                self.close()
                return None
            self.log.append(f"← {describe(event)}")
            if event.header.is_command:
                self.server_commands.append(event)
                await self.on_server_command(self, event)
                continue
            return event

    async def call(
        self,
        command: int,
        payload: bytes = b"",
        *,
        fds: Sequence[int] = (),
        msg_id: int | None = None,
    ) -> tuple[Header, Frame | None]:
        """Send a command and wait for the next reply: (what was sent, the reply or None)."""
        header = await self.send(command, payload, fds=fds, msg_id=msg_id)
        return header, await self.next_frame()

    async def negotiate(self, capabilities: Capabilities | None = None) -> Negotiated:
        """VERSION with ``capabilities`` (default: ``CHECKER_CAPABILITIES``, no twin socket).

        Raises :class:`~.model.Violation` when the server does not accept a proposal any
        server must accept.
        """
        request = VersionRequest(capabilities=capabilities or CHECKER_CAPABILITIES)
        _header, reply = await self.call(request.COMMAND, request.pack())
        sent = self.log[-2] if reply is not None else self.log[-1]
        if reply is None or reply.header.is_error or not reply.header.is_reply:
            reply_fds = reply.take_fds() if reply is not None else []
            _close(reply_fds)
            raise Violation(
                "the server did not accept a valid VERSION",
                sent=sent,
                received=describe(reply),
                expected="a VERSION reply",
            )
        fds = reply.take_fds()
        try:
            parsed = VersionReply.unpack(reply.payload, fds)
            self.negotiated = check_server_reply(request, parsed, len(fds))
        except Exception as exc:
            raise Violation(
                f"the VERSION reply is not valid: {exc}",
                sent=sent,
                received=describe(reply),
                expected="a reply the proposal allows",
            ) from None
        finally:
            _close(fds)
        return self.negotiated

    def close(self) -> None:
        self.transport.close()
        for event in self._events:
            if isinstance(event, Frame):
                event.close_fds()
        self._events.clear()
        for frame in self.server_commands:
            frame.close_fds()


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
