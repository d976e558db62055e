"""A blocking raw vfio-user client for the hardening figures (7 and 8): just enough wire.

It negotiates VERSION (no twin socket) and writes pre-built REGION_READ frames, so a
benchmark can pipeline as many requests as it likes and read (or never read) the replies.
"""

from __future__ import annotations

import socket
from pathlib import Path

from vfiouser_trio.protocol import Capabilities, Header, RegionReadRequest, VersionRequest
from vfiouser_trio.protocol.constants import HEADER_SIZE, Command
from vfiouser_trio.protocol.header import command_header

from .common import BenchError

#: The size of a successful REGION_READ reply carrying ``size`` bytes.
READ_REPLY_HEAD = HEADER_SIZE + 16


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise BenchError("the server closed the connection")
        data += chunk
    return bytes(data)


def read_reply(sock: socket.socket) -> tuple[Header, bytes]:
    """One whole message: its header and payload. An error reply is a BenchError."""
    header = Header.unpack(read_exactly(sock, HEADER_SIZE))
    payload = read_exactly(sock, header.msg_size - HEADER_SIZE)
    if header.is_error:
        raise BenchError(f"command {header.command} failed with errno {header.error}")
    return header, payload


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """A blocking socket to ``path``, negotiated (VERSION 0.2, no twin socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        version = VersionRequest(0, 2, Capabilities(max_msg_fds=8)).pack()
        sock.sendall(command_header(0, Command.VERSION, len(version)).pack() + version)
        read_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def region_reads(count: int, region: int, offset: int, size: int, first_id: int = 1) -> bytes:
    """``count`` REGION_READ frames back to back, message IDs from ``first_id`` (wrapping)."""
    payload = RegionReadRequest(region, offset, size).pack()
    return b"".join(
        command_header((first_id + i) & 0xFFFF, Command.REGION_READ, len(payload)).pack() + payload
        for i in range(count)
    )


def read_once(sock: socket.socket, region: int, offset: int, size: int) -> bytes:
    """One REGION_READ round trip; the data read."""
    sock.sendall(region_reads(1, region, offset, size))
    _, payload = read_reply(sock)
    return payload[16:]
