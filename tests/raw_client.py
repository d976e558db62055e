"""A minimal vfio-user client built straight on the engine, for server-side tests.

It negotiates and then sends whatever typed or raw messages a test wants, so
tests can check exact reply bytes and errnos. ``GuestRam`` serves the server's
DMA_READ / DMA_WRITE for maps made without an fd.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from vfiouser_trio.engine import Connection, HandlerResult, open_connection
from vfiouser_trio.limits import DEFAULT_LIMITS, ServerLimits
from vfiouser_trio.ordering import OrderingPolicy
from vfiouser_trio.protocol import (
    Capabilities,
    DmaReadReply,
    DmaReadRequest,
    DmaWriteReply,
    DmaWriteRequest,
    Request,
    TwinSocket,
    VersionReply,
    VersionRequest,
    decode_request,
)
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.serve import serve_connection


class GuestRam:
    """Client memory the server reaches by DMA_READ/DMA_WRITE (no fd shared)."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.mem = bytearray(size)
        self.requests: list[Command] = []

    async def handle(self, frame: Frame) -> HandlerResult:
        request = decode_request(frame.header.command, frame.payload, frame.fds)
        if isinstance(request, DmaReadRequest):
            self.requests.append(Command.DMA_READ)
            off = request.address - self.base
            return DmaReadReply(request.address, bytes(self.mem[off : off + request.count]))
        if isinstance(request, DmaWriteRequest):
            self.requests.append(Command.DMA_WRITE)
            off = request.address - self.base
            self.mem[off : off + len(request.data)] = request.data
            return DmaWriteReply(request.address, len(request.data))
        raise VfioUserError(errno.EINVAL)


@asynccontextmanager
async def session(
    device: Device,
    ram: GuestRam | None = None,
    *,
    twin: bool = False,
    policy: OrderingPolicy | None = None,
    limits: ServerLimits = DEFAULT_LIMITS,
) -> AsyncIterator[Connection]:
    """A negotiated raw client connection to ``device``, served over a socketpair."""
    ram = ram or GuestRam(0, 0)
    client_sock, server_sock = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(serve_connection, device, server_sock, policy=policy, limits=limits)
        )
        async with open_connection(client_sock, handler=ram.handle, max_recv_fds=8) as conn:
            caps = Capabilities(max_msg_fds=8, twin_socket=TwinSocket(True) if twin else None)
            reply = await conn.request(VersionRequest(0, 2, caps))
            assert isinstance(reply, VersionReply)
            conn.max_send_fds = reply.effective_capabilities.max_msg_fds
            if twin:
                assert len(reply.fds) == 1
                conn.attach_twin(reply.fds[0], requests_on_twin=False)
            else:
                assert reply.fds == ()
            yield conn


async def raw_payload(conn: Connection, request: Request) -> bytes:
    """Send ``request``; the reply's payload bytes exactly as they came."""
    frame = await conn.request_raw(request.COMMAND, request.pack(), request.fds)
    frame.close_fds()
    return bytes(frame.payload)


async def expect_errno(conn: Connection, request: Request, code: int) -> None:
    """Send ``request`` and require an error reply carrying ``code``."""
    await expect_raw_errno(conn, request.COMMAND, request.pack(), code, request.fds)


async def expect_raw_errno(
    conn: Connection, command: int, payload: bytes, code: int, fds: tuple[int, ...] = ()
) -> None:
    """Send raw bytes as ``command`` and require an error reply carrying ``code``."""
    with pytest.raises(VfioUserError) as exc:
        await conn.request_raw(command, payload, fds)
    assert exc.value.errno == code
