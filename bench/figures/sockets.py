"""Socket baselines shared by figures: plain Python over an AF_UNIX socketpair, no protocol.

* :func:`socketpair_mb_per_s`: a stream of sends between two trio tasks of this process
  (figure 3's message-DMA baseline, and figure 6's scale).
* :func:`reply_floor_mb_per_s`: request/reply between two processes, as message DMA is: this
  process (trio) sends a 16-byte request and receives a ``size``-byte reply from a peer
  process (trio, :func:`peer_main`) before the next request. It is the floor of what a
  Python DMA_READ between two processes can reach: no framing, no checks, no table.

The peer is ``python -m bench.figures.sockets FD``: it answers each 16-byte request (the
reply's size, u64, then 8 ignored bytes) with that many bytes, until end of stream.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from .common import BenchError
from .processes import REPO_ROOT, python_env, reap

_REQUEST = struct.Struct("=QQ")
#: Every measurement makes at least this many round trips, however short its time slice.
MIN_ROUNDS = 3
PEER_TIMEOUT = 60.0


async def socketpair_mb_per_s(size: int, chunk: int) -> float:
    """MB/s of ``size`` bytes sent in ``chunk``-byte pieces through an AF_UNIX socketpair."""
    left, right = trio.socket.socketpair()
    payload = memoryview(b"\xa5" * chunk)
    buffer = bytearray(chunk)
    with left, right:

        async def send() -> None:
            remaining = size
            while remaining:
                remaining -= await left.send(payload[: min(chunk, remaining)])

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            received = 0
            while received < size:
                received += await right.recv_into(buffer)
        return size / (time.perf_counter() - started) / 1e6


@asynccontextmanager
async def reply_peer() -> AsyncIterator[trio.socket.SocketType]:
    """A peer process answering requests on the yielded socket (see the module doc)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        argv = [sys.executable, "-m", "bench.figures.sockets", str(theirs.fileno())]
        try:
            process = await trio.lowlevel.open_process(
                argv, pass_fds=(theirs.fileno(),), env=python_env(), cwd=REPO_ROOT
            )
        except BaseException:
            mine.close()
            raise
    sock = trio.socket.from_stdlib_socket(mine)
    try:
        with sock:  # closing it is the peer's end of stream
            yield sock
    finally:
        await reap(process, PEER_TIMEOUT)
    if process.returncode != 0:
        raise BenchError(f"reply peer exited with {process.returncode}")


async def reply_floor_mb_per_s(sock: trio.socket.SocketType, size: int, seconds: float) -> float:
    """MB/s of ``size``-byte replies from :func:`reply_peer`, one request at a time."""
    request = _REQUEST.pack(size, 0)
    buffer = memoryview(bytearray(size))

    async def round_trip() -> None:
        await sock.send(request)
        received = 0
        while received < size:
            n = await sock.recv_into(buffer[received:])
            if not n:
                raise BenchError("the reply peer left")
            received += n

    return await timed_mb_per_s(round_trip, size, seconds)


async def timed_mb_per_s(
    one_round: Callable[[], Awaitable[None]], round_bytes: int, seconds: float
) -> float:
    """MB/s of ``one_round`` (moving ``round_bytes``), after a warm-up round, run for
    ``seconds`` and at least :data:`MIN_ROUNDS` rounds."""
    await one_round()  # warm: page tables, caches, first-use paths
    rounds = 0
    start = time.perf_counter()
    while True:
        await one_round()
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and rounds >= MIN_ROUNDS:
            return round_bytes * rounds / elapsed / 1e6


async def _serve_replies(fd: int) -> None:
    sock = trio.socket.socket(fileno=fd)
    payload = memoryview(b"\x5a" * (1 << 20))
    request = bytearray(_REQUEST.size)
    with sock:
        while True:
            got = 0
            while got < len(request):
                n = await sock.recv_into(memoryview(request)[got:])
                if not n:
                    return
                got += n
            size = _REQUEST.unpack(request)[0]
            if len(payload) < size:
                payload = memoryview(b"\x5a" * size)
            sent = 0
            while sent < size:
                sent += await sock.send(payload[sent:size])


def peer_main(argv: list[str]) -> int:
    """The peer process: serve replies on the inherited socket fd ``argv[0]``."""
    trio.run(_serve_replies, int(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(peer_main(sys.argv[1:]))
