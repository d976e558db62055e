"""The policy API: context, execute/release, declared relaxations, processing records, the
spec-order checker and the wait-for graph."""

from __future__ import annotations

import math
import os
import pathlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.nested_fetcher import Fetcher
from vfiouser_trio import cli
from vfiouser_trio.cli import load_policy
from vfiouser_trio.client import GuestMemory
from vfiouser_trio.engine import Connection, HandlerResult, Link, RawMessage, open_connection
from vfiouser_trio.ordering import (
    CommandJob,
    CommandSource,
    ConcurrentOrder,
    KeyedOrder,
    OrderingPolicy,
    PolicyContext,
    ProcessCommand,
    Processing,
    Relaxation,
    SpecOrder,
    region_key,
)
from vfiouser_trio.protocol import PciRegion
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import Header, command_header
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.testing import Direction, NestedDeviceFactory, Tracer, nested_device
from vfiouser_trio.testing.order_check import assert_spec_order, check_order
from vfiouser_trio.testing.wait_for import RequestState, wait_for_graph

pytestmark = pytest.mark.usefixtures("no_fd_leak")

Handler = Callable[[Frame], Awaitable[HandlerResult]]


async def nothing(frame: Frame) -> HandlerResult:
    return None


@asynccontextmanager
async def pair(
    server: Handler,
    *,
    policy: OrderingPolicy | None = None,
    client_policy: OrderingPolicy | None = None,
    client: Handler = nothing,
) -> AsyncIterator[tuple[Connection, Connection, Tracer, Tracer]]:
    """(client, server) connections over a socket pair, each traced."""
    a, b = socket.socketpair()
    client_tracer, server_tracer = Tracer(label="client"), Tracer(label="server")
    async with (
        open_connection(a, handler=client, hooks=client_tracer, policy=client_policy) as c,
        open_connection(b, handler=server, hooks=server_tracer, policy=policy) as s,
    ):
        yield c, s, client_tracer, server_tracer


def region_io(command: Command, region: int, *, no_reply: bool = False) -> Frame:
    header = command_header(0, command, 16, no_reply=no_reply)
    return Frame(header, struct.pack("=QII", 0, region, 0), [])


# --- the context and execute/release ---------------------------------------------------------


class ReleaseInOrder(OrderingPolicy):
    """Runs every command at once; replies leave in arrival order."""

    def __init__(self) -> None:
        self.contexts: list[PolicyContext] = []

    async def serve(self, ctx: PolicyContext) -> None:
        self.contexts.append(ctx)
        send, receive = trio.open_memory_channel[CommandJob](math.inf)

        async def release_in_order() -> None:
            async for job in receive:
                await job.release_reply()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_in_order)
            while True:
                send.send_nowait(ctx.execute(await ctx.commands.get()))


async def test_execute_runs_commands_at_once_and_release_orders_their_replies() -> None:
    slow_may_finish = trio.Event()
    handled: list[bytes] = []

    async def server(frame: Frame) -> HandlerResult:
        if frame.payload == b"slow":
            await slow_may_finish.wait()
        handled.append(bytes(frame.payload))
        return None

    policy = ReleaseInOrder()
    replied: list[bytes] = []

    async def ask(conn: Connection, what: bytes) -> None:
        await conn.request_raw(Command.REGION_READ, what)
        replied.append(what)

    with trio.fail_after(5):
        async with pair(server, policy=policy) as (client, _s, client_tracer, _st):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, client, b"slow")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(ask, client, b"fast")
                await trio.testing.wait_all_tasks_blocked()
                # The younger command ran while the older one waits (SpecOrder would not
                # start it), and its reply is held behind the older one's.
                assert handled == [b"fast"] and replied == []
                slow_may_finish.set()
            assert replied == [b"slow", b"fast"]
            replies = client_tracer.replies(direction=Direction.RECEIVED)
            assert [r.request.payload for r in replies if r.request] == [b"slow", b"fast"]
            [ctx] = policy.contexts
            assert ctx.link is Link.MAIN and ctx.name == "vfio-user"
            assert ctx.outstanding == 0 and ctx.running == 0
            before = trio.current_time()
            assert before <= ctx.now() <= trio.current_time()


async def test_the_context_counts_this_sides_outstanding_requests() -> None:
    seen: list[int] = []

    class Watching(OrderingPolicy):
        async def serve(self, ctx: PolicyContext) -> None:
            while True:
                frame = await ctx.commands.get()
                seen.append(ctx.outstanding)
                await ctx.process(frame)

    never = trio.Event()

    async def client_blocks(frame: Frame) -> HandlerResult:
        await never.wait()
        return None

    with trio.fail_after(5):
        # The server awaits a request of its own (which the client never answers) while
        # the client's command is taken: one outstanding.
        async with (
            pair(nothing, policy=Watching(), client=client_blocks) as (c, s, _ct, _st),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(s.request_raw, Command.DMA_READ, b"")
            await trio.testing.wait_all_tasks_blocked()
            await c.request_raw(Command.REGION_READ, b"")
            nursery.cancel_scope.cancel()
    assert seen == [1]


def test_an_old_style_policy_still_works_and_one_implementing_nothing_is_refused() -> None:
    class Old(OrderingPolicy):
        async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
            await process(await commands.get())

    assert Old().relaxations == ()
    with pytest.raises(TypeError, match="run\\(\\) or serve\\(\\)"):

        class Nothing(OrderingPolicy):  # refused at class creation
            pass


# --- declared relaxations ------------------------------------------------------------------------


def test_relaxations_name_the_pairs_they_allow() -> None:
    bypass = Relaxation(
        "reads pass posted writes to other regions",
        older={Command.REGION_WRITE},
        younger={Command.REGION_READ},
        older_no_reply=True,
        key=region_key,
    )
    posted_write0 = region_io(Command.REGION_WRITE, 0, no_reply=True)
    assert bypass.allows(posted_write0, region_io(Command.REGION_READ, 1))
    assert not bypass.allows(posted_write0, region_io(Command.REGION_READ, 0))  # same region
    assert not bypass.allows(region_io(Command.REGION_WRITE, 0), region_io(Command.REGION_READ, 1))
    assert not bypass.allows(posted_write0, region_io(Command.REGION_WRITE, 1))
    assert SpecOrder().relaxations == ()
    [any_pair] = ConcurrentOrder().relaxations
    assert any_pair.allows(posted_write0, region_io(Command.REGION_READ, 0))
    [keyed] = KeyedOrder(region_key).relaxations
    assert keyed.allows(posted_write0, region_io(Command.REGION_READ, 1))
    assert not keyed.allows(posted_write0, region_io(Command.REGION_READ, 0))
    version = Frame(command_header(0, Command.VERSION, 0), b"", [])
    assert not keyed.allows(version, region_io(Command.REGION_READ, 0))  # a barrier


# --- processing records and the checker ----------------------------------------------------------


async def posted_write_then_read(policy: OrderingPolicy, read_region: int | None = None) -> Tracer:
    """A posted REGION_WRITE to region 0 whose handler waits, then a REGION_READ (of
    ``read_region``, or with no payload): the server's trace."""
    write_may_finish = trio.Event()

    async def server(frame: Frame) -> HandlerResult:
        if frame.header.command == Command.REGION_WRITE:
            await write_may_finish.wait()
        return None

    with trio.fail_after(5):
        async with pair(server, policy=policy) as (client, _s, _ct, server_tracer):
            await client.post_raw(Command.REGION_WRITE, struct.pack("=QII", 0, 0, 0))
            async with trio.open_nursery() as nursery:
                read = b"" if read_region is None else region_io(Command.REGION_READ, read_region)
                payload = read if isinstance(read, bytes) else read.payload
                nursery.start_soon(client.request_raw, Command.REGION_READ, payload)
                await trio.testing.wait_all_tasks_blocked()
                write_may_finish.set()
            await server_tracer.wait_for(
                lambda r: r.command == Command.REGION_WRITE and r.direction is Direction.RECEIVED
            )
    return server_tracer


async def test_the_tracer_records_processing_of_no_reply_commands_too() -> None:
    tracer = await posted_write_then_read(SpecOrder())
    phases = [(r.header.command, r.phase) for r in tracer.processing]
    assert phases == [
        (Command.REGION_WRITE, Processing.START),
        (Command.REGION_WRITE, Processing.END),
        (Command.REGION_READ, Processing.START),
        (Command.REGION_READ, Processing.END),
    ]
    [write] = tracer.commands(Command.REGION_WRITE)
    assert tracer.processing[1].command is write and write.header.no_reply
    assert "REGION_WRITE id=0 end no_reply" in "\n".join(tracer.lines(processing=True))
    assert len(tracer.lines()) == len(tracer)  # messages only, unless asked


async def test_spec_order_passes_the_checker() -> None:
    tracer = await posted_write_then_read(SpecOrder())
    assert check_order(tracer) == []
    assert_spec_order(tracer, SpecOrder())


async def test_concurrent_order_is_reported_unless_its_relaxations_are_allowed() -> None:
    tracer = await posted_write_then_read(ConcurrentOrder())
    [violation] = check_order(tracer)
    assert violation.older.command == Command.REGION_WRITE
    assert violation.younger.command == Command.REGION_READ
    assert "the reply to REGION_READ id=1 left" in str(violation)
    assert "older REGION_WRITE id=0 (no_reply) was processed" in str(violation)
    with pytest.raises(AssertionError, match="1 spec-order violation"):
        assert_spec_order(tracer)
    assert check_order(tracer, ConcurrentOrder()) == []  # what it declares


async def test_keyed_order_breaks_the_spec_order_only_where_it_declares() -> None:
    # The write to region 0 is held; the read of region 1 overtakes it, as declared.
    tracer = await posted_write_then_read(KeyedOrder(region_key), read_region=1)
    assert len(check_order(tracer)) == 1
    assert check_order(tracer, KeyedOrder(region_key)) == []
    # A read of the same region waits for the write: nothing to report.
    tracer = await posted_write_then_read(KeyedOrder(region_key), read_region=0)
    assert check_order(tracer) == []


async def test_a_message_refused_unprocessed_is_no_older_command() -> None:
    """A message that is neither command nor reply is answered EINVAL by the connection
    core and never processed: it holds up no younger reply."""
    a, b = socket.socketpair()
    server_tracer = Tracer()
    with trio.fail_after(5), a:
        async with open_connection(b, handler=nothing, hooks=server_tracer):
            peer = trio.socket.from_stdlib_socket(a)
            neither = Header(0, Command.REGION_READ, 16, flags=2)
            await peer.send(neither.pack() + Header(1, Command.REGION_READ, 16).pack())
            received = b""
            while len(received) < 32:
                received += await peer.recv(64)
    [refused, answered] = server_tracer.replies()
    assert refused.is_error and refused.msg_id == 0 and answered.msg_id == 1
    assert check_order(server_tracer) == []


# --- the wait-for graph --------------------------------------------------------------------------


class Hold(OrderingPolicy):
    """Takes every command and never processes one (a client that stopped serving)."""

    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        held: list[Frame] = []
        try:
            while True:
                held.append(await commands.get())
        finally:
            for frame in held:
                frame.close_fds()


async def test_the_wait_for_graph_explains_a_deadlock() -> None:
    holder: dict[str, Connection] = {}

    async def server(frame: Frame) -> HandlerResult:
        await holder["server"].request_raw(Command.DMA_READ, b"")
        return None

    with trio.fail_after(5):
        async with pair(server, client_policy=Hold()) as (client, srv, ct, st):
            holder["server"] = srv
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.request_raw, Command.REGION_WRITE, b"")
                await trio.testing.wait_all_tasks_blocked()
                graph = wait_for_graph(ct, st)
                nursery.cancel_scope.cancel()
    assert [(e.side, e.command, e.msg_id, e.state) for e in graph.edges] == [
        ("client", Command.REGION_WRITE, 0, RequestState.PROCESSING),
        ("server", Command.DMA_READ, 0, RequestState.QUEUED),
    ]
    lines = str(graph).splitlines()
    assert lines[0].startswith("client awaits REGION_WRITE id=0: server is processing it")
    assert lines[1] == "server awaits DMA_READ id=0: client has it queued, not started"
    assert lines[2] == "server is processing REGION_WRITE id=0"


# --- nested devices ------------------------------------------------------------------------------


class Counting(OrderingPolicy):
    def __init__(self) -> None:
        self.commands: list[int] = []

    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        while True:
            frame = await commands.get()
            self.commands.append(frame.header.command)
            await process(frame)


async def test_nested_device_takes_a_client_policy_and_server_hooks() -> None:
    client_policy = Counting()
    server_tracer = Tracer()
    with GuestMemory(0x1000) as memory, trio.fail_after(5):
        memory.write(0x20, b"abcd")
        async with nested_device(
            Fetcher(), client_policy=client_policy, server_tracer=server_tracer
        ) as nested:
            await nested.client.dma_map(memory, 0x10000, share_fd=False)
            await nested.client.write(PciRegion.BAR0, 0, struct.pack("<Q", 0x10020))
            assert await nested.client.read(PciRegion.BAR0, 8, 4) == b"abcd"
            assert nested.server_tracer is server_tracer and server_tracer.label == "server"
            assert "nothing is awaited" in str(nested.wait_for_graph())
    assert client_policy.commands == [Command.DMA_READ]
    received = server_tracer.commands(Command.REGION_WRITE, direction=Direction.RECEIVED)
    assert len(received) == 1
    assert {r.header.command for r in server_tracer.processing} >= {Command.VERSION}
    assert_spec_order(server_tracer, SpecOrder())
    assert_spec_order(nested.tracer, client_policy)


# --- serve --policy ------------------------------------------------------------------------------


def test_load_policy_takes_a_name_or_module_attribute() -> None:
    assert isinstance(load_policy("spec"), SpecOrder)
    assert isinstance(load_policy("concurrent"), ConcurrentOrder)
    keyed = load_policy("region")
    assert isinstance(keyed, KeyedOrder) and keyed.key is region_key
    # A class, a factory, an object:
    assert isinstance(load_policy("vfiouser_trio.ordering:SpecOrder"), SpecOrder)
    assert isinstance(load_policy("vfiouser_trio.ordering:ConcurrentOrder"), ConcurrentOrder)
    loaded = load_policy("tests.test_policy_api:RELEASE_IN_ORDER")
    assert type(loaded).__name__ == "ReleaseInOrder"  # the module is imported again
    with pytest.raises(SystemExit, match="unknown policy 'nope': use one of concurrent, region"):
        load_policy("nope")
    with pytest.raises(SystemExit, match=r"cannot create policy '.*:KeyedOrder'"):
        load_policy("vfiouser_trio.ordering:KeyedOrder")  # needs a key function
    with pytest.raises(SystemExit, match="'math:pi' is not an OrderingPolicy class"):
        load_policy("math:pi")
    with pytest.raises(SystemExit, match="cannot load policy 'no_such_module:X'"):
        load_policy("no_such_module:X")


RELEASE_IN_ORDER = ReleaseInOrder()


def test_serve_passes_the_policy_to_every_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    given: list[object] = []

    async def fake_serve(
        device: Device,
        path: str | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        **options: object,
    ) -> None:
        given.append(options["policy"])
        task_status.started()

    monkeypatch.setattr(cli, "serve", fake_serve)
    sock = str(tmp_path / "s")
    assert cli.main(["serve", "gpio", f"--socket-path={sock}", "--policy=region"]) == 0
    assert cli.main(["serve", "gpio", f"--socket-path={sock}"]) == 0
    [keyed, default] = given
    assert isinstance(keyed, KeyedOrder) and default is None


# --- the client's posted writes ------------------------------------------------------------------


class Gated(Device):
    """BAR0 of 16 bytes: a write waits for ``may_write``; BAR1 is read-only."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7104, class_code=0xFF0000))
        self.regs = bytearray(0x10)
        self.may_write = trio.Event()
        self.add_bar(0, 0x10, read=self.read0, write=self.write0)
        self.add_bar(1, 0x10, read=self.read1)

    async def read1(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(self.regs[offset : offset + size])

    async def write0(self, offset: int, data: bytes) -> None:
        await self.may_write.wait()
        self.regs[offset : offset + len(data)] = data


async def test_a_posted_write_returns_before_the_device_has_written() -> None:
    device = Gated()
    server_tracer = Tracer()
    with trio.fail_after(5):
        async with nested_device(device, server_tracer=server_tracer) as nested:
            await nested.client.write(PciRegion.BAR0, 0, b"\x01\x02", posted=True)
            await trio.testing.wait_all_tasks_blocked()
            assert device.regs[:2] == b"\0\0"  # the handler still waits, the client does not
            device.may_write.set()
            # The spec's order: the read is answered after the posted write was processed.
            assert await nested.client.read(PciRegion.BAR0, 0, 2) == b"\x01\x02"
            # A posted write the server refuses (BAR1 is read-only) is answered with nothing.
            await nested.client.write(PciRegion.BAR1, 0, b"\x01", posted=True)
            assert await nested.client.read(PciRegion.BAR1, 0, 1) == b"\0"
    writes = nested.tracer.commands(Command.REGION_WRITE, direction=Direction.SENT)
    assert len(writes) == 2 and all(w.header.no_reply for w in writes)
    assert server_tracer.replies(Command.REGION_WRITE) == []
    assert_spec_order(server_tracer)


async def test_vfio_pair_takes_the_same_options(vfio_pair: NestedDeviceFactory) -> None:
    server_tracer = Tracer()
    client_policy = Counting()
    nested = await vfio_pair(
        Fetcher(),
        policy=ConcurrentOrder(),
        client_policy=client_policy,
        server_tracer=server_tracer,
    )
    with GuestMemory(0x1000) as memory:
        await nested.client.dma_map(memory, 0x10000, share_fd=False)
        await nested.client.write(PciRegion.BAR0, 0, struct.pack("<Q", 0x10020))
        await nested.client.dma_unmap(0x10000, 0x1000)
    assert client_policy.commands == [Command.DMA_READ]
    assert nested.server_tracer is server_tracer
    assert check_order(server_tracer, ConcurrentOrder()) == []


# --- the client's start-now, await-later calls ---------------------------------------------------


async def test_one_task_pipelines_requests_and_awaits_their_replies_later() -> None:
    device = Gated()
    server_tracer = Tracer()
    with trio.fail_after(5):
        async with nested_device(device, server_tracer=server_tracer) as nested:
            client = nested.client
            write = await client.start_write(PciRegion.BAR0, 0, b"\x05")  # its handler waits
            read = await client.start_read(PciRegion.BAR0, 0, 1)
            refused = await client.start_write(PciRegion.BAR1, 0, b"\x01")  # read-only
            await server_tracer.wait_for(
                lambda r: r.command == Command.REGION_WRITE and r.direction is Direction.RECEIVED,
                count=2,
            )
            # All three are on the server's side while the first is processed.
            assert not (write.done or read.done or refused.done)
            device.may_write.set()
            await write
            assert await read == b"\x05"  # the spec's order: after the write
            with pytest.raises(VfioUserError):
                await refused
            abandoned = await client.start_read(PciRegion.BAR0, 0, 1)
            abandoned.cancel()  # its late reply is consumed
            assert await client.read(PciRegion.BAR0, 0, 1) == b"\x05"
            assert (await client.start_read(PciRegion.BAR0, 0, 0)).done  # nothing to send
    sent = nested.tracer.commands(Command.REGION_READ, Command.REGION_WRITE)
    assert [r.command for r in sent][:3] == [
        Command.REGION_WRITE,
        Command.REGION_READ,
        Command.REGION_WRITE,
    ]


async def test_a_held_reply_is_dropped_with_its_fds_when_the_connection_closes() -> None:
    jobs: list[CommandJob] = []

    class NeverRelease(OrderingPolicy):
        async def serve(self, ctx: PolicyContext) -> None:
            while True:
                jobs.append(ctx.execute(await ctx.commands.get()))

    async def server(frame: Frame) -> HandlerResult:
        r, w = os.pipe()
        os.close(w)
        return RawMessage(b"", [r], transfer_fds=True)  # the engine owns it

    with trio.fail_after(5):
        async with (
            pair(server, policy=NeverRelease()) as (client, _s, _ct, _st),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(client.request_raw, Command.REGION_READ, b"")
            while not jobs:
                await trio.testing.wait_all_tasks_blocked()
            await jobs[0].wait_handled()
            assert not jobs[0].done
            nursery.cancel_scope.cancel()
    # Leaving closed the connection: the held reply's fd is closed (no_fd_leak).
