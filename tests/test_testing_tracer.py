"""The recording tracer on real sessions: order, links, decodes, filters, printing; and chains."""

from __future__ import annotations

import errno
import io
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from vfiouser_trio.engine import (
    Connection,
    ConnectionHooks,
    Forward,
    HandlerResult,
    Link,
    open_connection,
)
from vfiouser_trio.protocol import (
    Capabilities,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteReply,
    RegionWriteRequest,
    TwinSocket,
    VersionReply,
    VersionRequest,
)
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import Header
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection
from vfiouser_trio.testing import (
    Direction,
    ErrorReply,
    HookChain,
    Tracer,
    chain,
    nested_device,
)
from vfiouser_trio.transport import Transport

pytestmark = pytest.mark.usefixtures("no_fd_leak")

SENT, RECEIVED = Direction.SENT, Direction.RECEIVED


class Scratch(Device):
    """BAR0: 256 bytes of registers that read back what was written."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7101, class_code=0xFF0000))
        self.regs = bytearray(0x100)
        self.add_bar(0, 0x100, read=self.read0, write=self.write0)

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(self.regs[offset : offset + size])

    async def write0(self, offset: int, data: bytes) -> None:
        self.regs[offset : offset + len(data)] = data


async def refuse(frame: Frame) -> HandlerResult:
    raise VfioUserError(errno.EINVAL)


@asynccontextmanager
async def engine_session(
    device: Device, hooks: ConnectionHooks | None
) -> AsyncIterator[Connection]:
    """A raw engine connection (the client side carries ``hooks``) served by serve_connection."""
    client_sock, server_sock = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, device, server_sock)
        async with open_connection(client_sock, handler=refuse, hooks=hooks) as conn:
            yield conn


async def test_records_a_real_session_in_order_with_decodes() -> None:
    tracer = Tracer()
    device = Scratch()
    device.regs[0:4] = b"\x2a\x00\x00\x00"
    with trio.fail_after(5):
        async with engine_session(device, tracer) as conn:
            await conn.request(VersionRequest(0, 2))
            assert await conn.request(RegionReadRequest(0, 0, 4)) == RegionReadReply(
                0, 0, b"\x2a\0\0\0"
            )
            with pytest.raises(VfioUserError):
                await conn.request(RegionReadRequest(0, 0x100, 4))  # past the BAR's end

    assert [(r.direction, r.command, r.is_reply, r.msg_id) for r in tracer] == [
        (SENT, Command.VERSION, False, 0),
        (RECEIVED, Command.VERSION, True, 0),
        (SENT, Command.REGION_READ, False, 1),
        (RECEIVED, Command.REGION_READ, True, 1),
        (SENT, Command.REGION_READ, False, 2),
        (RECEIVED, Command.REGION_READ, True, 2),
    ]
    assert all(r.link is Link.MAIN for r in tracer)
    version, version_reply, read, read_reply, bad_read, error = tracer.records
    assert version.decode() == VersionRequest(0, 2)
    reply = version_reply.decode()
    assert isinstance(reply, VersionReply) and (reply.major, reply.minor) == (0, 2)
    assert read.decode() == RegionReadRequest(0, 0, 4)
    assert read_reply.decode() == RegionReadReply(0, 0, b"\x2a\0\0\0")
    assert bad_read.decode() == RegionReadRequest(0, 0x100, 4)
    assert error.is_error and error.errno == errno.EINVAL
    assert error.decode() == ErrorReply(Command.REGION_READ, errno.EINVAL)
    # Replies know their request; times never go backwards.
    assert read_reply.request is read and error.request is bad_read
    assert version.request is None
    times = [r.time for r in tracer]
    assert times == sorted(times) and tracer[0].elapsed >= 0


async def test_filters_by_kind_command_direction_and_link() -> None:
    tracer = Tracer()
    with trio.fail_after(5):
        async with engine_session(Scratch(), tracer) as conn:
            await conn.request(VersionRequest(0, 2))
            await conn.request(RegionWriteRequest(0, 8, b"\1\2"))
            await conn.request(RegionReadRequest(0, 8, 2))
            with pytest.raises(VfioUserError):
                await conn.request(RegionReadRequest(5, 0, 4))  # no region 5

    assert [r.decode() for r in tracer.commands(Command.REGION_READ)] == [
        RegionReadRequest(0, 8, 2),
        RegionReadRequest(5, 0, 4),
    ]
    assert [r.command for r in tracer.commands()] == [
        Command.VERSION,
        Command.REGION_WRITE,
        Command.REGION_READ,
        Command.REGION_READ,
    ]
    assert [r.decode() for r in tracer.replies(Command.REGION_WRITE, Command.REGION_READ)] == [
        RegionWriteReply(0, 8, 2),
        RegionReadReply(0, 8, b"\1\2"),
        ErrorReply(Command.REGION_READ, errno.EINVAL),
    ]
    assert [r.msg_id for r in tracer.errors()] == [3]
    assert tracer.sent() == tracer.commands() == tracer.select(direction=SENT)
    assert tracer.received() == tracer.replies()
    assert tracer.select(link=Link.TWIN) == []
    assert tracer.select(Command.REGION_READ, reply=True, error=False)[0].decode() == (
        RegionReadReply(0, 8, b"\1\2")
    )
    tracer.clear()
    assert len(tracer) == 0 and str(tracer) == ""


async def test_twin_socket_messages_are_recorded_on_the_twin_link() -> None:
    tracer = Tracer()
    client_sock, server_sock = socket.socketpair()

    async def answer_empty(frame: Frame) -> HandlerResult:
        return None

    with trio.fail_after(5):
        async with (
            open_connection(server_sock, handler=answer_empty) as server,
            open_connection(client_sock, handler=answer_empty, hooks=tracer) as client,
        ):
            ours, theirs = socket.socketpair()
            server.attach_twin(ours, requests_on_twin=True)
            client.attach_twin(theirs, requests_on_twin=False)
            await server.request_raw(Command.DMA_WRITE, b"x" * 16)
            await client.request_raw(Command.REGION_READ, b"y" * 16)
    assert [(r.link, r.direction, r.command, r.is_reply) for r in tracer] == [
        (Link.TWIN, RECEIVED, Command.DMA_WRITE, False),
        (Link.TWIN, SENT, Command.DMA_WRITE, True),
        (Link.MAIN, SENT, Command.REGION_READ, False),
        (Link.MAIN, RECEIVED, Command.REGION_READ, True),
    ]
    assert tracer[1].request is tracer[0]


async def test_fd_counts_are_recorded_and_decodes_carry_placeholders() -> None:
    tracer = Tracer()
    with trio.fail_after(5):
        async with engine_session(Scratch(), tracer) as conn:
            caps = Capabilities(max_msg_fds=8, twin_socket=TwinSocket(True))
            reply = await conn.request(VersionRequest(0, 2, caps))
            assert isinstance(reply, VersionReply)
            conn.attach_twin(reply.fds[0], requests_on_twin=False)
    version_reply = tracer.replies(Command.VERSION)[0]
    assert version_reply.fd_count == 1
    decoded = version_reply.decode()
    assert isinstance(decoded, VersionReply) and decoded.fds == (-1,)
    assert tracer.commands(Command.VERSION)[0].fd_count == 0


async def test_dump_prints_one_line_per_message() -> None:
    tracer = Tracer()
    with trio.fail_after(5):
        async with engine_session(Scratch(), tracer) as conn:
            await conn.request(VersionRequest(0, 2))
            conn.next_message_id = 7
            await conn.request(RegionReadRequest(0, 0, 4))
            await conn.request(RegionWriteRequest(0, 0x10, bytes(range(40))))
            with pytest.raises(VfioUserError):
                await conn.request(RegionReadRequest(0, 0x100, 4))
    lines = str(tracer).splitlines()
    assert len(lines) == len(tracer) == 8
    stamp = r"\+\d+\.\d{6} "
    assert re.fullmatch(stamp + r"main → VERSION id=0 major=0 minor=2", lines[0]) is None
    assert re.fullmatch(stamp + r"main → VERSION id=0", lines[0])  # all fields are defaults
    assert re.fullmatch(stamp + r"main ← VERSION reply id=0 .*", lines[1])
    assert re.fullmatch(stamp + r"main → REGION_READ id=7 region=0 offset=0x0 count=4", lines[2])
    assert re.fullmatch(
        stamp + r"main ← REGION_READ reply id=7 region=0 offset=0x0 data=00000000", lines[3]
    )
    assert re.fullmatch(
        stamp + r"main → REGION_WRITE id=8 region=0 offset=0x10 data=<40 bytes 0001020304050607…>",
        lines[4],
    )
    assert re.fullmatch(stamp + r"main ← REGION_READ error id=9 EINVAL", lines[7])
    out = io.StringIO()
    tracer.dump(out)
    assert out.getvalue() == str(tracer) + "\n"


def test_undecodable_and_unknown_messages_still_print() -> None:
    tracer = Tracer()  # outside trio: time starts at the first record

    async def main() -> None:
        a, b = socket.socketpair()
        with trio.fail_after(5):
            async with (
                open_connection(a, handler=refuse),
                open_connection(b, handler=refuse, hooks=tracer) as conn,
            ):
                for command, payload in ((Command.REGION_READ, b"short"), (0x7777, b"")):
                    with pytest.raises(VfioUserError):
                        await conn.request_raw(command, payload)

    trio.run(main)
    assert tracer[0].elapsed == 0
    lines = tracer.lines()
    assert "REGION_READ id=0 <undecodable:" in lines[0] and "payload=73686f7274" in lines[0]
    assert "command 30583 id=1" in lines[2]
    assert lines[3].endswith("command 30583 error id=1 EINVAL")
    assert tracer[2].command == 0x7777


async def test_broken_stream_is_recorded_as_a_framing_record() -> None:
    tracer = Tracer()
    a, b = socket.socketpair()
    peer = Transport(a)
    with trio.fail_after(5):
        async with open_connection(b, handler=refuse, hooks=tracer) as conn:
            peer.write(Header(3, Command.REGION_READ, 8))  # msg_size below the header's
            await conn.wait_closed()
    peer.close()
    (event,) = tracer.framing_errors
    assert event.link is Link.MAIN
    # The engine answers the broken command with EINVAL before it closes.
    (answer,) = tracer.records
    assert (answer.direction, answer.msg_id, answer.errno) == (SENT, 3, errno.EINVAL)
    lines = tracer.lines()
    assert "main ! broken stream" in lines[0] and "REGION_READ error id=3 EINVAL" in lines[1]


async def test_wait_for_returns_once_enough_records_match() -> None:
    tracer = Tracer()
    with trio.fail_after(5):
        async with engine_session(Scratch(), tracer) as conn, trio.open_nursery() as nursery:
            seen: list[int] = []

            async def watch() -> None:
                found = await tracer.wait_for(lambda r: r.is_reply, count=2)
                seen.extend(r.msg_id for r in found)

            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            await conn.request(VersionRequest(0, 2))
            await trio.testing.wait_all_tasks_blocked()
            assert seen == []
            await conn.request(RegionReadRequest(0, 0, 1))
    assert seen == [0, 1]


async def test_nested_device_trace_shows_the_client_session() -> None:
    device = Scratch()
    with trio.fail_after(5):
        async with nested_device(device) as pair:
            await pair.client.write(0, 4, b"\x05")
            assert await pair.client.read(0, 4, 1) == b"\x05"
            with pytest.raises(VfioUserError):
                await pair.client.read(0, 0x100, 4)
    tracer = pair.tracer
    assert tracer.commands()[0].command == Command.VERSION
    write, read, bad = tracer.commands(Command.REGION_WRITE, Command.REGION_READ)
    assert write.decode() == RegionWriteRequest(0, 4, b"\x05")
    assert read.decode() == RegionReadRequest(0, 4, 1)
    assert bad.decode() == RegionReadRequest(0, 0x100, 4)
    replies = tracer.replies(Command.REGION_WRITE, Command.REGION_READ)
    assert [r.decode() for r in replies] == [
        RegionWriteReply(0, 4, 1),
        RegionReadReply(0, 4, b"\x05"),
        ErrorReply(Command.REGION_READ, errno.EINVAL),
    ]
    assert [r.request for r in replies] == [write, read, bad]


# --------------------------------------------------------------------------- chains


class Tag(ConnectionHooks):
    """Appends its name to a shared log for every frame it sees, then passes it on."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.log.append(f"{self.name}→")
        forward(frame)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.log.append(f"{self.name}←")
        forward(frame)


def test_chain_skips_none_and_unwraps_a_single_hook() -> None:
    tracer = Tracer()
    assert chain() is None and chain(None, None) is None
    assert chain(None, tracer) is tracer
    combined = chain(tracer, Tracer())
    assert isinstance(combined, HookChain) and combined.hooks[0] is tracer


async def test_chain_is_layered_from_the_application_out() -> None:
    log: list[str] = []
    inner, outer = Tracer(), Tracer()
    hooks = chain(Tag("a", log), inner, Tag("b", log), outer)
    with trio.fail_after(5):
        async with engine_session(Scratch(), hooks) as conn:
            await conn.request(VersionRequest(0, 2))
    assert log == ["a→", "b→", "b←", "a←"]
    assert [r.index for r in inner] == [r.index for r in outer] == [0, 1]
    # The outer tracer saw the request after the inner one and the reply before it.
    assert outer[0].time >= inner[0].time and outer[1].time <= inner[1].time


class Sink(Device):
    """BAR0: 1 MiB that swallows writes."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7102, class_code=0xFF0000))
        self.add_bar(0, 1 << 20, read=self.read0, write=self.write0)
        self.writes = 0

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def write0(self, offset: int, data: bytes) -> None:
        self.writes += 1


async def test_memory_is_bounded_recent_payloads_are_kept_whole() -> None:
    """A trace of 60 writes of 1 MiB used to keep all 60 MiB; now the full payloads of the
    latest records stay within ``full_payload_bytes`` and older ones keep a prefix."""
    prefix, budget, count = 64, 4 << 20, 60
    tracer = Tracer(payload_prefix=prefix, full_payload_bytes=budget)
    device = Sink()
    data = [bytes([i]) * (1 << 20) for i in range(count)]
    async with engine_session(device, tracer) as conn:
        await conn.request(VersionRequest(0, 2))
        for chunk in data:
            await conn.request(RegionWriteRequest(0, 0, chunk))
    device.close()
    assert device.writes == count
    assert sum(len(r.payload) for r in tracer) <= budget + prefix * len(tracer)
    writes = tracer.commands(Command.REGION_WRITE)
    assert len(writes) == count
    first, last = writes[0], writes[-1]
    assert first.truncated and first.payload_size == (1 << 20) + 16
    assert first.payload == RegionWriteRequest(0, 0, data[0]).pack()[:prefix]
    with pytest.raises(VfioUserError):
        first.decode()
    assert "kept" in str(first)
    assert not last.truncated and last.decode() == RegionWriteRequest(0, 0, data[-1])
    # The reply still decodes (against its request when the request is whole).
    assert tracer.replies(Command.REGION_WRITE)[-1].decode() == RegionWriteReply(0, 0, 1 << 20)
    tracer.clear()
    assert len(tracer) == 0
