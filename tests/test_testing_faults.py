"""Fault injection on real sessions: drop, delay, reorder, disconnect, corrupt; never a hang.

Time-related tests run on pytest-trio's ``autojump_clock``: a request that never gets its
reply times out at once in virtual time.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from vfiouser_trio.client import ConnectionClosedError, GuestMemory
from vfiouser_trio.engine import Connection, ConnectionHooks, HandlerResult, open_connection
from vfiouser_trio.ordering import ConcurrentOrder, OrderingPolicy, SpecOrder
from vfiouser_trio.protocol import RegionReadRequest, VersionRequest
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.protocol.errors import ProtocolError, VfioUserError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import Header
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection
from vfiouser_trio.testing import (
    Corrupt,
    Delay,
    Direction,
    Disconnect,
    Drop,
    Reorder,
    Tracer,
    chain,
    nested_device,
    set_header,
    set_payload,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")

SENT, RECEIVED = Direction.SENT, Direction.RECEIVED
READ, WRITE = Command.REGION_READ, Command.REGION_WRITE


class Registers(Device):
    """BAR0: 256 bytes of registers. Reads of offset 0x40 wait for ``gate`` (when set up)."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7102, class_code=0xFF0000))
        self.regs = bytearray(range(0x100))
        self.reads: list[int] = []
        self.writes: list[bytes] = []
        self.gate: trio.Event | None = None
        self.add_bar(0, 0x100, read=self.read0, write=self.write0)

    async def read0(self, offset: int, size: int) -> bytes:
        self.reads.append(offset)
        if offset == 0x40 and self.gate is not None:
            await self.gate.wait()
        return bytes(self.regs[offset : offset + size])

    async def write0(self, offset: int, data: bytes) -> None:
        self.writes.append(data)
        self.regs[offset : offset + len(data)] = data


async def refuse(frame: Frame) -> HandlerResult:
    raise VfioUserError(errno.EINVAL)


@asynccontextmanager
async def engine_session(hooks: ConnectionHooks) -> AsyncIterator[Connection]:
    """An engine connection carrying ``hooks``, served a Registers device."""
    client_sock, server_sock = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, Registers(), server_sock)
        async with open_connection(client_sock, handler=refuse, hooks=hooks) as conn:
            yield conn


def test_selection_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="nth"):
        Drop(0)
    with pytest.raises(ValueError, match="exactly one"):
        Delay(1)
    with pytest.raises(ValueError, match="exactly one"):
        Delay(1, until=trio.Event(), seconds=1)
    with pytest.raises(ValueError, match="after"):
        Reorder(1, after=0)


# --------------------------------------------------------------------------- drop


async def test_drop_counts_messages_both_ways(autojump_clock: trio.testing.MockClock) -> None:
    drop = Drop(3)  # VERSION (1) and its reply (2) pass; the next message is lost
    tracer = Tracer()
    with trio.fail_after(60):  # virtual seconds: bounds the whole test
        async with engine_session(chain(drop, tracer)) as conn:
            await conn.request(VersionRequest(0, 2))
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(10):
                    await conn.request(RegionReadRequest(0, 0, 4))
            assert await conn.request(RegionReadRequest(0, 8, 1))  # the connection is fine
        assert (drop.matched, drop.fired) == (5, 1) and drop.triggered.is_set()
        # On the wire: the dropped request is missing, the next one went out as usual.
        assert [r.decode() for r in tracer.commands(READ)] == [RegionReadRequest(0, 8, 1)]


async def test_dropped_request_times_out_and_never_reaches_the_device(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Registers()
    drop = Drop(1, direction=SENT, command=READ)
    with trio.fail_after(60):  # virtual seconds: bounds the whole test
        async with nested_device(device, faults=drop) as pair:
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(10):
                    await pair.client.read(0, 0x10, 4)
            assert device.reads == []
            assert await pair.client.read(0, 0x10, 1) == b"\x10"
            assert device.reads == [0x10]
        assert drop.fired == 1
        assert [r.decode() for r in pair.tracer.commands(READ)] == [RegionReadRequest(0, 0x10, 1)]


async def test_dropped_reply_is_on_the_wire_but_never_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Registers()
    drop = Drop(direction=RECEIVED, reply=True, where=lambda f: f.payload.endswith(b"\x20"))
    with trio.fail_after(60):  # virtual seconds: bounds the whole test
        async with nested_device(device, faults=drop) as pair:
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(10):
                    await pair.client.read(0, 0x20, 1)
            assert await pair.client.read(0, 0x21, 1) == b"\x21"
        assert device.reads == [0x20, 0x21]
        assert len(pair.tracer.replies(READ)) == 2  # the tracer sits on the wire side of the fault


# --------------------------------------------------------------------------- delay


async def test_delay_until_an_event_lets_later_messages_overtake() -> None:
    device = Registers()
    gate = trio.Event()
    delay = Delay(1, direction=SENT, command=WRITE, until=gate)
    with trio.fail_after(5):
        async with nested_device(device, faults=delay) as pair:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.client.write, 0, 0, b"\xaa")
                await delay.triggered.wait()
                assert await pair.client.read(0, 0, 1) == b"\x00"  # overtook the write
                await trio.testing.wait_all_tasks_blocked()
                assert device.writes == [] and delay.holding == 1
                gate.set()
            assert device.writes == [b"\xaa"] and delay.released == 1
            assert await pair.client.read(0, 0, 1) == b"\xaa"
    sent = [r.command for r in pair.tracer.commands(READ, WRITE)]
    assert sent == [READ, WRITE, READ]


async def test_delay_for_a_time(autojump_clock: trio.testing.MockClock) -> None:
    delay = Delay(1, direction=RECEIVED, command=WRITE, reply=True, seconds=5)
    with trio.fail_after(60):  # virtual seconds: bounds the whole test
        async with nested_device(Registers(), faults=delay) as pair:
            start = trio.current_time()
            await pair.client.write(0, 0, b"\x01")
            assert trio.current_time() - start == pytest.approx(5)
            start = trio.current_time()
            await pair.client.write(0, 0, b"\x02")  # only the first one was selected
            assert trio.current_time() == start
        (first, _second) = pair.tracer.replies(WRITE)
        # On the wire the answer came at once; the client was handed it 5 s later.
        assert first.request is not None and first.time == first.request.time


async def test_held_frames_and_their_fds_are_discarded_on_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # DMA_MAP carries the guest memory's fd: the delayed frame holds a duplicate of it.
    delay = Delay(1, direction=SENT, command=Command.DMA_MAP, until=trio.Event())
    with trio.fail_after(60):  # virtual seconds: bounds the whole test
        with GuestMemory(0x1000) as memory:
            async with nested_device(Registers(), faults=delay) as pair:
                with trio.move_on_after(10):
                    await pair.client.dma_map(memory, 0x10000)
                assert delay.holding == 1
        assert delay.holding == 0 and delay.released == 0  # and no fd leaked (fixture)


# --------------------------------------------------------------------------- reorder


@pytest.mark.parametrize("policy", [SpecOrder(), ConcurrentOrder()], ids=["spec", "concurrent"])
async def test_reorder_requests(policy: OrderingPolicy) -> None:
    device = Registers()
    reorder = Reorder(1, direction=SENT, command=WRITE)
    with trio.fail_after(5):
        async with nested_device(device, policy=policy, faults=reorder) as pair:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.client.write, 0, 0, b"\x01")
                await reorder.triggered.wait()
                nursery.start_soon(pair.client.write, 0, 0, b"\x02")
            assert device.writes == [b"\x02", b"\x01"]
            assert await pair.client.read(0, 0, 1) == b"\x01"  # the older write landed last
    first, second = pair.tracer.commands(WRITE)
    assert first.msg_id == second.msg_id + 1  # on the wire, in swapped order


@pytest.mark.parametrize("policy", [SpecOrder(), ConcurrentOrder()], ids=["spec", "concurrent"])
async def test_reorder_replies_still_match_their_requests(policy: OrderingPolicy) -> None:
    device = Registers()
    reorder = Reorder(1, direction=RECEIVED, command=READ, reply=True)
    delivered = Tracer()  # on the client's side of the fault: sees what the client got
    results: dict[int, bytes] = {}

    async def read(offset: int) -> None:
        results[offset] = await pair.client.read(0, offset, 2)

    with trio.fail_after(5):
        async with (
            nested_device(device, policy=policy, faults=[delivered, reorder]) as pair,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(read, 0x30)
            await reorder.triggered.wait()  # its reply is held back
            nursery.start_soon(read, 0x50)
    assert results == {0x30: b"\x30\x31", 0x50: b"\x50\x51"}
    assert device.reads == [0x30, 0x50]
    wire = pair.tracer.replies(READ)
    assert [r.decode().offset for r in wire] == [0x30, 0x50]  # type: ignore[union-attr]
    got = delivered.replies(READ)
    assert [r.decode().offset for r in got] == [0x50, 0x30]  # type: ignore[union-attr]


async def test_reorder_after_several_messages() -> None:
    reorder = Reorder(2, direction=SENT, after=2)  # hold message 2 until 2 more went out
    tracer = Tracer()
    with trio.fail_after(5):
        async with engine_session(chain(reorder, tracer)) as conn:
            await conn.request(VersionRequest(0, 2))
            async with trio.open_nursery() as nursery:
                for offset in (1, 2, 3):
                    nursery.start_soon(conn.request, RegionReadRequest(0, offset, 1))
                    await trio.testing.wait_all_tasks_blocked()
    assert [r.decode() for r in tracer.commands(READ)] == [
        RegionReadRequest(0, 2, 1),
        RegionReadRequest(0, 3, 1),
        RegionReadRequest(0, 1, 1),
    ]


# --------------------------------------------------------------------------- disconnect


async def test_disconnect_at_message_n() -> None:
    disconnect = Disconnect(3)
    with trio.fail_after(5):
        async with engine_session(disconnect) as conn:
            await conn.request(VersionRequest(0, 2))
            with pytest.raises(ConnectionClosedError) as info:
                await conn.request(RegionReadRequest(0, 0, 4))
            assert info.value.errno == errno.ECONNRESET
            assert conn.closed.is_set()
            with pytest.raises(ConnectionClosedError) as info:
                await conn.request(RegionReadRequest(0, 0, 4))
            assert info.value.errno == errno.ENOTCONN


async def test_disconnect_fails_every_pending_call() -> None:
    device = Registers()
    device.gate = trio.Event()  # a read of 0x40 stays pending in the device
    disconnect = Disconnect(1, direction=SENT, command=WRITE)
    failures: list[int] = []

    async def expect_closed(call: Awaitable[object]) -> None:
        with pytest.raises(ConnectionClosedError) as info:
            await call
        failures.append(info.value.errno)

    with trio.fail_after(5):
        async with nested_device(device, faults=disconnect) as pair:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_closed, pair.client.read(0, 0x40, 4))
                await trio.testing.wait_all_tasks_blocked()
                assert device.reads == [0x40]
                nursery.start_soon(expect_closed, pair.client.write(0, 0, b"\x01"))
            assert failures == [errno.ECONNRESET, errno.ECONNRESET]
            assert pair.client.closed
            with pytest.raises(ConnectionClosedError):
                await pair.client.read(0, 0, 1)
    assert device.writes == []


async def test_disconnect_on_a_received_reply() -> None:
    device = Registers()
    disconnect = Disconnect(1, direction=RECEIVED, command=WRITE, reply=True)
    with trio.fail_after(5):
        async with nested_device(device, faults=disconnect) as pair:
            with pytest.raises(ConnectionClosedError):
                await pair.client.write(0, 0, b"\x07")
    assert device.writes == [b"\x07"]  # the device did it; the answer was lost


# --------------------------------------------------------------------------- corrupt


async def test_corrupt_command_number_gets_an_error_reply() -> None:
    corrupt = Corrupt(1, direction=SENT, command=READ)
    with trio.fail_after(5):
        async with nested_device(Registers(), faults=corrupt) as pair:
            with pytest.raises(VfioUserError) as info:
                await pair.client.read(0, 0, 4)
            assert info.value.errno == errno.EINVAL
            assert await pair.client.read(0, 1, 1) == b"\x01"  # still connected
    garbled = pair.tracer.commands(0xFFFF)[0]
    assert garbled.is_reply is False and "command 65535 id=" in str(garbled)
    assert pair.tracer.errors(0xFFFF)[0].errno == errno.EINVAL


async def test_corrupt_msg_size_breaks_the_stream_and_closes() -> None:
    corrupt = Corrupt(1, direction=SENT, command=READ, mangle=set_header(msg_size=8))
    with trio.fail_after(5):
        # One socket, so the EINVAL answer is read before the hang-up (with a twin socket,
        # the twin's close may be seen first).
        async with nested_device(Registers(), faults=corrupt, twin_socket=False) as pair:
            # The device answers the unreadable header with EINVAL, then hangs up.
            with pytest.raises(VfioUserError) as info:
                await pair.client.read(0, 0, 4)
            assert info.value.errno == errno.EINVAL
            await pair.client.wait_closed()
            with pytest.raises(ConnectionClosedError):
                await pair.client.read(0, 0, 4)


async def test_corrupt_reply_payload_fails_the_call() -> None:
    corrupt = Corrupt(direction=RECEIVED, command=READ, mangle=set_payload(b"\0" * 3))
    with trio.fail_after(5):
        async with nested_device(Registers(), faults=corrupt) as pair:
            with pytest.raises(ProtocolError):
                await pair.client.read(0, 0, 4)
            with pytest.raises(ProtocolError):
                await pair.client.read(0, 0, 4)
            await pair.client.write(0, 0, b"\x01")
    assert corrupt.fired == 2


def test_set_payload_function_and_size_fix() -> None:
    frame = Frame(Header(1, READ, 16 + 4), b"abcd")
    mangled = set_payload(lambda p: p + b"ef")(frame)
    assert mangled.payload == b"abcdef" and mangled.header.msg_size == 22
    kept = set_payload(b"", fix_size=False)(frame)
    assert kept.header.msg_size == 20 and kept.payload == b""
