"""VFIO_USER_VERSION (command 1): messages and negotiation.

Request and reply share one format: major u16, minor u16, then optional
NUL-terminated UTF-8 JSON ``{"capabilities": {...}}``.

Effective limits after negotiation (``Negotiated``): every limit a side
advertises is about what *it* can receive or hold, so

- a side enforces its OWN ``max_data_xfer_size`` on what it receives
  (REGION_READ/WRITE counts for a server; DMA_READ/WRITE counts for a client) and
  SENDS a data-transfer ``count`` up to the smaller of the two values: the peer's
  bounds what the peer accepts, ours what we accept back (a read's reply carries
  ``count`` bytes), so a peer advertising a huge value never raises our own
  receive limit;
- a side may send at most the PEER's ``max_msg_fds`` fds in one message;
- ``max_dma_maps`` and ``pgsizes`` are the SERVER's (the client obeys them);
- ``write_multiple`` is on only if both sides said true;
- twin-socket mode is on only if the client proposed it and the reply carries
  ``supported: true`` with a valid ``fd_index``.
A peer whose JSON omits an entry is taken to advertise the spec's default.
Every value is checked on arrival against the bounds in ``capabilities.py``
(``CAPABILITY_BOUNDS``): out of range is ProtocolError (EINVAL).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from ._util import expect_min_size, fail
from .capabilities import Capabilities, TwinSocket
from .constants import VERSION_MAJOR, VERSION_MINOR, Command
from .errors import ProtocolError
from .message import Buffer, Message, Reply, Request

_VERSION = struct.Struct("=HH")


def _pack_version(major: int, minor: int, caps: Capabilities | None) -> bytes:
    head = _VERSION.pack(major, minor)
    if caps is None:
        return head
    return head + caps.to_json().encode() + b"\0"


def _unpack_version(cls: type[Message], payload: Buffer) -> tuple[int, int, Capabilities | None]:
    expect_min_size(cls, payload, _VERSION.size)
    major, minor = _VERSION.unpack_from(payload, 0)
    if len(payload) == _VERSION.size:
        return major, minor, None
    data = bytes(payload[_VERSION.size :])
    if data[-1] != 0:
        fail(cls, "version JSON is not NUL-terminated")
    # Like C parsers, the string ends at the first NUL.
    data = data[: data.index(0)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        fail(cls, "version JSON is not valid UTF-8")
    try:
        caps = Capabilities.from_json(text)
    except ProtocolError as exc:
        fail(cls, exc.message)
    return major, minor, caps


@dataclass(frozen=True, slots=True)
class VersionReply(Reply):
    """The server's VERSION reply; ``fds`` holds the twin socket when enabled.

    ``capabilities`` is None when the reply carried no JSON (all defaults).
    Twin-socket consistency is judged by ``check_server_reply``, not here.
    """

    COMMAND: ClassVar[Command] = Command.VERSION

    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    capabilities: Capabilities | None = None
    fds: tuple[int, ...] = ()

    @property
    def effective_capabilities(self) -> Capabilities:
        return self.capabilities if self.capabilities is not None else Capabilities()

    def pack(self) -> bytes:
        return _pack_version(self.major, self.minor, self.capabilities)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        major, minor, caps = _unpack_version(cls, payload)
        twin = caps.twin_socket if caps is not None else None
        if fds and (twin is None or twin.fd_index is None):
            fail(cls, f"{len(fds)} fds sent without a twin_socket.fd_index")
        return cls(major, minor, caps, tuple(fds))


@dataclass(frozen=True, slots=True)
class VersionRequest(Request):
    """The client's proposal. ``major`` is not checked here: that is the server's call.

    ``capabilities`` is None when the request carried no JSON (all defaults).
    """

    COMMAND: ClassVar[Command] = Command.VERSION
    REPLY: ClassVar[type[Message]] = VersionReply

    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    capabilities: Capabilities | None = None

    @property
    def effective_capabilities(self) -> Capabilities:
        return self.capabilities if self.capabilities is not None else Capabilities()

    def pack(self) -> bytes:
        return _pack_version(self.major, self.minor, self.capabilities)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        if fds:
            fail(cls, f"VERSION request sent with {len(fds)} fds")
        return cls(*_unpack_version(cls, payload))


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of VERSION, seen from one side (see the module docstring)."""

    minor: int
    ours: Capabilities
    peer: Capabilities
    write_multiple: bool
    #: Index into the VERSION reply's fds of the twin socket, or None.
    twin_fd_index: int | None

    @property
    def twin_socket(self) -> bool:
        return self.twin_fd_index is not None

    @property
    def send_max_data_xfer_size(self) -> int:
        """Largest ``count`` this side puts in a data-transfer message: the smaller of
        the peer's limit and ours (a read's reply comes back at that size)."""
        return min(self.peer.max_data_xfer_size, self.ours.max_data_xfer_size)

    @property
    def recv_max_data_xfer_size(self) -> int:
        """Largest ``count`` this side accepts (its own advertised value)."""
        return self.ours.max_data_xfer_size

    @property
    def send_max_msg_fds(self) -> int:
        """Most fds this side may send in one message."""
        return self.peer.max_msg_fds


def wants_twin_socket(request: VersionRequest) -> bool:
    """True if the client proposed twin-socket mode (the server may then offer one)."""
    return request.effective_capabilities.twin_supported


def negotiate_server_reply(
    request: VersionRequest,
    server_caps: Capabilities,
    *,
    twin_fd_index: int | None = None,
    server_minor: int = VERSION_MINOR,
) -> tuple[VersionReply, Negotiated]:
    """Build the server's reply to ``request`` and the session it establishes.

    - major must be ours (ProtocolError EINVAL otherwise: answer it, then close);
    - reply minor = min(client minor, ``server_minor``);
    - ``write_multiple`` is replied true only if the client proposed it and
      ``server_caps`` has it;
    - twin-socket mode is enabled iff ``twin_fd_index`` is given; that is only
      allowed when ``wants_twin_socket(request)`` (ValueError otherwise). The
      caller sends its twin socket's client end as fds[twin_fd_index];
    - the server's limits and ``extra`` entries are advertised as given.
    The returned reply carries no fds: the caller attaches them when sending.
    """
    if request.major != VERSION_MAJOR:
        raise ProtocolError(f"unsupported major version {request.major}", command=Command.VERSION)
    client = request.effective_capabilities
    if twin_fd_index is not None and not client.twin_supported:
        raise ValueError("twin socket offered to a client that did not propose it")
    minor = min(request.minor, server_minor)
    write_multiple = client.write_multiple and server_caps.write_multiple
    twin = TwinSocket(True, twin_fd_index) if twin_fd_index is not None else None
    reply_caps = Capabilities(
        max_msg_fds=server_caps.max_msg_fds,
        max_data_xfer_size=server_caps.max_data_xfer_size,
        max_dma_maps=server_caps.max_dma_maps,
        pgsizes=server_caps.pgsizes,
        twin_socket=twin,
        write_multiple=write_multiple,
        extra=server_caps.extra,
    )
    reply = VersionReply(VERSION_MAJOR, minor, reply_caps)
    session = Negotiated(
        minor=minor,
        ours=reply_caps,
        peer=client,
        write_multiple=write_multiple,
        twin_fd_index=twin_fd_index,
    )
    return reply, session


def check_server_reply(proposed: VersionRequest, reply: VersionReply, nfds: int) -> Negotiated:
    """Validate the server's reply on the client side; ProtocolError means close.

    ``nfds`` is the number of fds that came with the reply. Rejects a major
    differing from the proposal, a minor above it, ``write_multiple`` the client
    did not propose, and any inconsistent twin-socket answer (enabled without
    being proposed, without a valid ``fd_index``, or fds sent without twin mode).
    """

    def bad(message: str) -> ProtocolError:
        return ProtocolError(f"VERSION reply: {message}", command=Command.VERSION)

    if reply.major != proposed.major:
        raise bad(f"major {reply.major} differs from proposed {proposed.major}")
    if reply.minor > proposed.minor:
        raise bad(f"minor {reply.minor} is above proposed {proposed.minor}")
    ours = proposed.effective_capabilities
    peer = reply.effective_capabilities
    if peer.write_multiple and not ours.write_multiple:
        raise bad("write_multiple enabled but not proposed")
    twin_fd_index: int | None = None
    if peer.twin_supported:
        assert peer.twin_socket is not None
        index = peer.twin_socket.fd_index
        if not ours.twin_supported:
            raise bad("twin_socket enabled but not proposed")
        if index is None or not 0 <= index < nfds:
            raise bad(f"twin_socket.fd_index {index} does not name one of {nfds} fds")
        twin_fd_index = index
    elif nfds:
        raise bad(f"{nfds} fds sent without twin-socket mode")
    return Negotiated(
        minor=reply.minor,
        ours=ours,
        peer=peer,
        write_multiple=peer.write_multiple and ours.write_multiple,
        twin_fd_index=twin_fd_index,
    )
