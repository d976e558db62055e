"""The client against a server whose answers are corrupted on the way (the server side of
"the peer is untrusted").

A genuine server (the end-to-end device: callback, mmap-able, sparse and I/O BARs, DMA,
interrupts; or the migration tests' device) answers the client through a proxy that mutates
what the server sends, frame by frame, as hypothesis draws it: bytes flipped, fields set to
extremes, payloads scrambled, cut or padded (framing kept or broken), message IDs and flags
changed, frames dropped, duplicated or preceded by invented commands, fds replaced or added.
Whatever arrives, every client call returns or raises a ``VfioUserError`` (the base of every
error the client documents: error replies, ProtocolError, ConnectionClosedError, the
timeouts), nothing else escapes ``connect``, no call outlives its reply timeout, and every
fd is back once the connection is closed.

``VFIOUSER_FUZZ_EXAMPLES`` raises the number of cases (CI runs the default, derandomized).
"""

from __future__ import annotations

import array
import mmap
import os
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e_device import TestDevice
from tests.fd_leaks import fd_count
from tests.migration_pair import Blob
from vfiouser_trio.client import GuestMemory, VfioUserError, connect
from vfiouser_trio.protocol import Feature, MigState
from vfiouser_trio.protocol.constants import FLAG_ERROR, HEADER_SIZE, PciIrq
from vfiouser_trio.protocol.framing import close_fds
from vfiouser_trio.protocol.header import HEADER_STRUCT
from vfiouser_trio.server.serve import serve_connection

MAX_FDS = 16
EXAMPLES = int(os.environ.get("VFIOUSER_FUZZ_EXAMPLES", "200"))
#: The server's frames a plan reaches: connect's (VERSION and the info queries, ~16) and
#: the workload's (~25).
FRAMES = 48

MUTATIONS = (
    "pass",
    "flip_byte",
    "scramble_payload",
    "extreme_field",
    "cut_payload",
    "pad_payload",
    "bogus_size",
    "other_msg_id",
    "error_flag",
    "drop",
    "duplicate",
    "invented_command_first",
    "fds_replaced_by_a_pipe",
    "extra_fd",
)
EXTREMES = (0, 1, 2, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 32, 1 << 63, (1 << 64) - 1, 0x1000_0000)
mutation = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 0xFFFF))


@dataclass
class Proxy:
    """Forwards the client's bytes and fds untouched, and the server's frames mutated."""

    plan: Sequence[tuple[str, int]]
    pipes: list[int] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)

    def _pipe_end(self) -> int:
        r, w = os.pipe()
        self.pipes.append(w)  # kept open until the end, so the read end looks alive
        return r

    def mutate(self, frame: bytes, fds: list[int]) -> list[tuple[bytes, list[int]]]:
        """What reaches the client instead of ``frame`` (which came with ``fds``). Headers
        are packed by hand: a Header would not hold what some mutations send."""
        index = len(self.applied)
        kind, n = self.plan[index] if index < len(self.plan) else ("pass", 0)
        self.applied.append(kind)
        msg_id, command, size, flags, error = HEADER_STRUCT.unpack_from(frame)
        payload = frame[HEADER_SIZE:]
        if kind == "flip_byte" and payload:
            at = n % len(payload)
            payload = payload[:at] + bytes([payload[at] ^ (1 + n % 255)]) + payload[at + 1 :]
        elif kind == "extreme_field" and len(payload) >= 4:
            # A count, size, offset or page size at an extreme: 4 or 8 bytes, aligned.
            width = 8 if n & 1 and len(payload) >= 8 else 4
            at = (n >> 1) % (len(payload) // width) * width
            value = EXTREMES[(n >> 8) % len(EXTREMES)] % (1 << (8 * width))
            field_bytes = value.to_bytes(width, "little")
            payload = payload[:at] + field_bytes + payload[at + width :]
        elif kind == "scramble_payload":
            payload = random.Random(n).randbytes(len(payload))
        elif kind == "cut_payload":
            payload = payload[: len(payload) - 1 - n % max(len(payload), 1)]
        elif kind == "pad_payload":
            payload += bytes(range(256))[: 1 + n % 64]
        elif kind == "bogus_size":
            size = n % (3 * HEADER_SIZE)  # framing broken: the client must hang up
            return [(HEADER_STRUCT.pack(msg_id, command, size, flags, error) + payload, fds)]
        elif kind == "other_msg_id":
            msg_id = (msg_id + 1 + n) & 0xFFFF
        elif kind == "error_flag":
            flags |= FLAG_ERROR
            error = n % 140
        elif kind == "drop":
            close_fds(fds)
            return []
        elif kind == "duplicate":
            copies = [os.dup(fd) for fd in fds]
            return [(frame, fds), (frame, copies)]
        elif kind == "invented_command_first":
            invented = HEADER_STRUCT.pack(n & 0xFFFF, n % 20, HEADER_SIZE + n % 40, 0, 0)
            invented += bytes(n % 40)
            return [(invented, []), (frame, fds)]
        elif kind == "fds_replaced_by_a_pipe" and fds:
            close_fds(fds)
            fds = [self._pipe_end()]
        elif kind == "extra_fd":
            fds = [*fds, self._pipe_end()]
        return [
            (
                HEADER_STRUCT.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error)
                + payload,
                fds,
            )
        ]

    def close(self) -> None:
        close_fds(self.pipes)
        self.pipes.clear()


async def _recv(sock: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    data, ancdata, _, _ = await sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
            fds.extend(got)
    return data, fds


async def _send(sock: trio.socket.SocketType, data: bytes, fds: Sequence[int]) -> None:
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = await sock.sendmsg([data], ancdata)
    while sent < len(data):  # the fds went with the first byte
        sent += await sock.send(data[sent:])


async def _forward(source: trio.socket.SocketType, sink: trio.socket.SocketType) -> None:
    """The client's side: bytes and fds as they come, until either end goes."""
    try:
        while True:
            data, fds = await _recv(source)
            try:
                if not data:
                    return
                await _send(sink, data, fds)
            finally:
                close_fds(fds)
    except OSError:
        return  # a hang-up on either side
    finally:
        sink.shutdown(socket.SHUT_WR)


async def _mutate(
    source: trio.socket.SocketType, sink: trio.socket.SocketType, proxy: Proxy
) -> None:
    """The server's side, one whole frame at a time (its fds come with its first bytes)."""
    buffer, held = b"", []
    try:
        while True:
            data, fds = await _recv(source)
            held += fds
            if not data:
                return
            buffer += data
            while len(buffer) >= HEADER_SIZE:
                size = HEADER_STRUCT.unpack_from(buffer)[2]
                if len(buffer) < size:
                    break
                frame, buffer = buffer[:size], buffer[size:]
                fds, held = held, []
                for out, out_fds in proxy.mutate(frame, fds):
                    try:
                        await _send(sink, out, out_fds)
                    finally:
                        close_fds(out_fds)
    except OSError:
        return
    finally:
        close_fds(held)
        sink.shutdown(socket.SHUT_WR)


async def _workload(client_sock: socket.socket, twin: bool) -> list[str]:
    """Every kind of call the client makes; the errors each raised (names only)."""
    errors: list[str] = []

    async def call(step: Callable[[], Awaitable[object]]) -> None:
        try:
            await step()
        except VfioUserError as exc:
            errors.append(type(exc).__name__)

    async def pipelined() -> None:
        first = await client.start_read(0, 0, 4)
        second = await client.start_write(0, 4, b"wxyz")
        await first
        await second

    memory = GuestMemory(0x11_0000)  # the devices DMA at 0x10_0000 .. 0x20_0010
    try:
        async with connect(
            client_sock, twin_socket=twin, negotiation_timeout=5, reply_timeout=2
        ) as client:
            await call(lambda: client.read(0, 0, 4))
            await call(lambda: client.write(0, 0, b"abcd"))
            await call(lambda: client.read(1, 8, 8))  # mmap-able on the e2e device
            await call(lambda: client.read(2, 0, 16, use_mmap=False))
            await call(pipelined)
            await call(lambda: client.write_multi([(0, 0, b"1234"), (0, 8, b"5678")]))
            await call(lambda: client.region_io_fds(0))
            await call(lambda: client.dma_map(memory, 0x10_0000))
            await call(lambda: client.enable_irqs(PciIrq.MSI, 1))
            await call(lambda: client.start_dirty_logging(ranges=[(0x10_0000, 0x11_0000)]))
            await call(lambda: client.write(0, 0x18, b"\x5a\0\0\0"))  # the devices DMA
            await call(lambda: client.dirty_pages(0x10_0000, 0x11_0000, mmap.PAGESIZE))
            await call(client.stop_dirty_logging)
            await call(lambda: client.supports_feature(Feature.MIGRATION, get=True))
            await call(client.migration_info)
            await call(lambda: client.set_migration_state(MigState.STOP_COPY))
            await call(client.read_migration_data)
            await call(lambda: client.set_migration_state(MigState.STOP))
            await call(lambda: client.set_migration_state(MigState.RUNNING))
            await call(client.migration_state)
            await call(client.reset)
            await call(client.dma_unmap_all)
            await call(lambda: client.disable_irqs(PciIrq.MSI))
    except VfioUserError as exc:
        errors.append(type(exc).__name__)
    finally:
        memory.close()
    return errors


def run_case(plan: Sequence[tuple[str, int]], *, twin: bool, migratable: bool = False) -> None:
    """Serve, corrupt as ``plan`` says, run the workload (the server's DMA on the twin
    socket, which the proxy does not touch, or on the main one); AssertionError if anything
    but a VfioUserError escaped or an fd was left behind."""
    before = fd_count()
    proxy = Proxy(plan)

    async def main() -> None:
        device = Blob() if migratable else TestDevice()
        client_sock, proxy_a = socket.socketpair()
        proxy_b, server_sock = socket.socketpair()
        a, b = trio.socket.from_stdlib_socket(proxy_a), trio.socket.from_stdlib_socket(proxy_b)
        try:
            with trio.fail_after(60):  # virtual time: every wait the client has is bounded
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(serve_connection, device, server_sock)
                    nursery.start_soon(_forward, a, b)
                    nursery.start_soon(_mutate, b, a, proxy)
                    await _workload(client_sock, twin)
                    nursery.cancel_scope.cancel()
        finally:
            a.close()
            b.close()
            device.close()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    except BaseException as exc:
        escaped = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
        raise AssertionError(f"escaped the client with {proxy.applied}: {escaped!r}") from exc
    finally:
        proxy.close()
    assert fd_count() == before, f"fds left after {proxy.applied}"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="VFIOUSER_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=st.lists(mutation, max_size=FRAMES), twin=st.booleans(), migratable=st.booleans())
def test_no_corruption_of_the_servers_answers_breaks_the_client(
    plan: list[tuple[str, int]], twin: bool, migratable: bool
) -> None:
    run_case(plan, twin=twin, migratable=migratable)


@pytest.mark.parametrize(("twin", "migratable"), [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("kind", [k for k in MUTATIONS if k != "pass"])
def test_each_corruption_alone_on_every_answer(kind: str, twin: bool, migratable: bool) -> None:
    """Every mutation applied to each of the server's frames in turn."""
    for at in range(FRAMES):
        run_case([("pass", 0)] * at + [(kind, 7 * at + 3)], twin=twin, migratable=migratable)
