"""Our client and CLI against libvfio-user's own samples/server, a real C peer.

The harness (``tests/libvfio_user.py``) builds the samples from the libvfio-user source the
QEMU provisioning unpacks, or skips. What samples/server (``samples/server.c``) offers: PCI
ids dead:beef / cafe:babe; BAR0, 8 bytes by messages only (write a ``time_t``: INTx fires at
that second, then the server writes 4096 bytes of 'A' to the first DMA map with DMA_WRITE
and reads them back with DMA_READ); BAR1, 0x3000 bytes of a temporary file whose first and
last pages are sparse-mmap areas (one fd each); a migration region (index 9); INTx, ERR and
REQ with one vector each; a reset callback.

The tree QEMU 10.2 vendors (commit 0b28d205 of libvfio-user) is protocol 0.1: no twin
socket, no DEVICE_FEATURE (dirty logging is its former DIRTY_PAGES command 14) and the
former region-based migration (v1). The tests check what that version shares with ours and
pin what it does not, so that a newer tree shows up here as a failure to look at.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.e2e_device import TestDevice, served
from tests.libvfio_user import SampleProcess, Samples, connect_socket, sample_server, samples
from tests.mappings import ShrinkableMemory
from vfiouser_trio.client import Client, GuestMemory, VfioUserError, connect
from vfiouser_trio.engine import Connection, ConnectionHooks, Forward, Link
from vfiouser_trio.protocol.constants import Command, PciRegion
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.server import DEFAULT_SERVER_CAPABILITIES, serve
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.regions import RegionType, SparseArea
from vfiouser_trio.testing import Tracer

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = 4096
CLI = [sys.executable, "-m", "vfiouser_trio.cli"]
#: INTx and DMA wait for the server's timer (whole seconds of wall time).
TIMER_TIMEOUT = 10.0
MIGRATION_REGION = 9


@pytest.fixture(scope="module")
def built() -> Samples:
    return samples()


class DmaReadServed(ConnectionHooks):
    """Sets ``done`` once the client has answered ``count`` DMA_READ commands."""

    def __init__(self, count: int = 1) -> None:
        self.left = count
        self.done = trio.Event()

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        forward(frame)
        if frame.header.is_reply and frame.header.command == Command.DMA_READ:
            self.left -= 1
            if self.left == 0:
                self.done.set()


@asynccontextmanager
async def samples_server_client(
    built: Samples, tmp_path: Path, hooks: ConnectionHooks | None = None
) -> AsyncIterator[tuple[SampleProcess, Client]]:
    """samples/server and our client connected to it."""
    async with (
        sample_server(built, tmp_path) as server,
        connect(await connect_socket(server.socket), hooks=hooks) as client,
    ):
        yield server, client


async def fire_intx_and_dma(client: Client, hooks: DmaReadServed) -> None:
    """Arm the server's timer through BAR0, take the INTx and wait for its DMA to finish.

    The sample checks nothing else while it does DMA (a command arriving before its DMA
    reply would be taken for that reply), so the test sends nothing until it is done.
    """
    irq = (await client.enable_irqs(0))[0]
    # The sample arms "due - time(NULL)" whole seconds, and 0 disarms: leave 2 s of slack
    # for a loaded machine between our clock reading and its.
    await client.write(PciRegion.BAR0, 0, struct.pack("<q", int(time.time()) + 3))
    with trio.fail_after(TIMER_TIMEOUT):
        assert await irq.wait() == 1
        await hooks.done.wait()


async def test_our_client_tours_samples_server(built: Samples, tmp_path: Path) -> None:
    async with sample_server(built, tmp_path) as server:
        sock = await connect_socket(server.socket)
        async with connect(sock) as client:
            negotiated = client.negotiated
            assert negotiated is not None
            # Protocol 0.1: the answer is the minimum of both minors; no twin socket offered.
            assert negotiated.minor == 1
            assert not client.twin_socket and not client.write_multiple
            assert dict(negotiated.peer.extra) == {"migration": '{"pgsize":4096}'}

            assert (client.info.num_regions, client.info.num_irqs) == (10, 5)
            bar0, bar1 = client.regions[PciRegion.BAR0], client.regions[PciRegion.BAR1]
            assert (bar0.size, bar0.mmappable, bar0.areas) == (8, False, ())
            assert bar1.size == 0x3000 and bar1.mmappable
            sparse = bar1.sparse_areas
            assert sparse is not None
            assert [(a.offset, a.size) for a in sparse] == [(0, PAGE), (2 * PAGE, PAGE)]
            migration = client.regions[MIGRATION_REGION].region_type
            assert migration is not None and migration.type == 3  # VFIO_REGION_TYPE_MIGRATION
            assert {i: info.count for i, info in client.irq_info.items()} == {
                0: 1,
                1: 0,
                2: 0,
                3: 1,
                4: 1,
            }

            header = await client.config.header()
            assert (header.vendor_id, header.device_id) == (0xDEAD, 0xBEEF)
            assert (header.subsystem_vendor_id, header.subsystem_id) == (0xCAFE, 0xBABE)
            assert header.interrupt_pin == 1
            # Its BARs are I/O BARs (no VFU_REGION_FLAG_MEM); BAR1's register sizes 0x3000
            # to its lowest bit, as Linux would; unimplemented BARs (I/O bit only) are none.
            bars = await client.config.bars()
            assert [(b.index, b.size, b.io) for b in bars] == [(0, 8, True), (1, PAGE, True)]

            # 64 concurrent config reads, each answered in turn.
            results: list[bytes] = []

            async def read_ids() -> None:
                results.append(await client.read(PciRegion.CONFIG, 0, 4))

            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(read_ids)
            assert results == [bytes.fromhex("addeefbe")] * 64

            # BAR1 by messages (its BAR1 read ignores the offset: a sample's shortcut).
            await client.write(PciRegion.BAR1, 0, b"vfio-user-trio")
            assert await client.read(PciRegion.BAR1, 0, 14) == b"vfio-user-trio"
            # A BAR0 access of any size but 8 is the sample's EINVAL.
            with pytest.raises(VfioUserError) as info:
                await client.read(PciRegion.BAR0, 0, 4)
            assert info.value.errno == errno.EINVAL

            await client.reset()
    assert "device reset by client" in server.output()


async def test_sparse_mmap_areas_of_a_temporary_file_are_mapped_and_used(
    built: Samples, tmp_path: Path
) -> None:
    """samples/server backs BAR1 with a mkstemp file, which cannot be sealed against
    shrinking. The client maps its two sparse areas all the same, with no zero-copy view:
    it reaches them through guarded copies (a truncated file is EFAULT, not SIGBUS), and
    what it stores there is what the server reads, and the reverse."""
    async with samples_server_client(built, tmp_path) as (server, client):
        bar1 = client.regions[PciRegion.BAR1]
        assert [(a.offset, a.size, a.view) for a in bar1.areas] == [
            (0, PAGE, None),
            (2 * PAGE, PAGE, None),
        ]
        await client.write(PciRegion.BAR1, 0, b"through the map")
        assert await client.read(PciRegion.BAR1, 0, 15, use_mmap=False) == b"through the map"
        await client.write(PciRegion.BAR1, 2 * PAGE, b"by message", use_mmap=False)
        assert await client.read(PciRegion.BAR1, 2 * PAGE, 10) == b"by message"
        await client.write(PciRegion.BAR1, PAGE, b"middle")  # not an area: a message
    log = server.output()
    # Only the accesses made by message reached the server's callbacks.
    assert [line.split(": ", 1)[1] for line in log.splitlines() if "region1:" in line] == [
        "region1: read 15 bytes at 0",
        "region1: wrote 10 bytes at 0x2000",
        "region1: wrote 6 bytes at 0x1000",
    ]


async def test_a_guarded_area_whose_file_is_cut_short_falls_back_to_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = TestDevice()
    region = device.region(PciRegion.BAR1)
    assert region is not None
    assert region.memory is not None
    region.memory.close()
    memory = ShrinkableMemory(region.size)
    region.memory = memory  # type: ignore[assignment]
    memory.view[:5] = b"hello"
    try:
        async with served(device) as (client, _):
            [area] = client.regions[PciRegion.BAR1].areas
            assert area.view is None
            os.ftruncate(memory.fd, 0)  # the server cuts its file short under our mapping
            with caplog.at_level(logging.WARNING, logger="vfiouser_trio.client.regions"):
                assert await client.read(PciRegion.BAR1, 0, 5) == b"hello"
            assert "faulted" in caplog.text and "REGION_READ/WRITE messages" in caplog.text
            assert client.regions[PciRegion.BAR1].areas == ()
            await client.write(PciRegion.BAR1, PAGE, b"world")
            assert bytes(memory.view[PAGE : PAGE + 5]) == b"world"
    finally:
        device.close()


@pytest.mark.parametrize("first_shared", [False, True], ids=["no-fd-first", "fd-first"])
async def test_intx_and_message_dma_into_our_maps(
    built: Samples, tmp_path: Path, first_shared: bool
) -> None:
    """The server's DMA goes to its first map, with DMA_WRITE then DMA_READ (this version
    of libvfio-user does no direct DMA in its sample): the client serves both from the
    guest memory, for a map without fd as for one whose fd the server has."""
    hooks = DmaReadServed()
    async with samples_server_client(built, tmp_path, hooks) as (server, client):
        with GuestMemory(4 * PAGE) as memory:
            await client.dma_map(memory, 0, size=2 * PAGE, share_fd=first_shared)
            await client.dma_map(
                memory, 0x10_0000, offset=2 * PAGE, size=2 * PAGE, share_fd=not first_shared
            )
            await fire_intx_and_dma(client, hooks)
            assert memory.read(0, PAGE) == b"A" * PAGE
            assert memory.read(PAGE, 3 * PAGE) == bytes(3 * PAGE)
            await client.dma_unmap(0x10_0000, 2 * PAGE)
            await client.dma_unmap_all()
            assert client.dma_maps == ()
    log = server.output()
    assert "do_dma_io: READ  addr (nil) count 4096" in log
    assert "removing DMA region [0x10_0000".replace("_", "") in log


async def test_dirty_logging_is_not_in_protocol_0_1(built: Samples, tmp_path: Path) -> None:
    """DMA logging is a DEVICE_FEATURE (command 16); this libvfio-user has only its former
    DIRTY_PAGES (14) and answers EINVAL, which the client passes on unchanged."""
    async with samples_server_client(built, tmp_path) as (server, client):
        with GuestMemory(PAGE) as memory:
            await client.dma_map(memory, 0)
            ranges: list[tuple[int, int]] | None
            for ranges in (None, []):
                with pytest.raises(VfioUserError) as info:
                    await client.start_dirty_logging(ranges=ranges)
                assert info.value.errno == errno.EINVAL
                assert client.dirty_logging is None
        # The connection is still good.
        assert (await client.config.header()).vendor_id == 0xDEAD
    assert "bad command 16" in server.output()


async def test_lspci_on_samples_server(built: Samples, tmp_path: Path) -> None:
    async with sample_server(built, tmp_path) as server:
        result = await trio.run_process(
            [*CLI, "lspci", os.fspath(server.socket)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        with trio.fail_after(TIMER_TIMEOUT):
            await server.process.wait()
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert out.startswith("00:00.0 0000: dead:beef\n00: ad de ef be ")
    assert "20: 01 00 00 00 01 00 00 00 00 00 00 00 fe ca be ba" in out
    assert "# region 1 BAR1   size 0x3000 rwm sparse mmap [0x0+0x1000, 0x2000+0x1000]" in out
    assert "# region 9 REGION9 size 0x5000 rwm sparse mmap [0x1000+0x4000] type 0x3/0x1" in out
    assert "# irq 0 INTX  count 1" in out
    # A client that leaves ends the single-client sample, as it ends QEMU's session.
    assert server.process.returncode == 0


# --- libvfio-user's samples/client against our server -----------------------------------


class SamplesServerTwin(Device):
    """What samples/client expects of samples/server, in Python: its ids, BAR0's 8 bytes by
    messages, BAR1 with two sparse-mmap pages, a region 9 typed as VFIO's migration region
    (ten regions in all, which the client checks), INTx without automask (the client never
    unmasks), ERR and REQ."""

    def __init__(self) -> None:
        super().__init__(
            PciIdentity(0xDEAD, 0xBEEF, subsystem_vendor_id=0xCAFE, subsystem_id=0xBABE),
            name="samples-server-twin",
        )
        self.bar0 = bytes(8)
        self.add_bar(0, 8, read=self.read_bar0, write=self.write_bar0, io=True)
        self.add_bar(1, 4 * PAGE, sparse=[SparseArea(0, PAGE), SparseArea(2 * PAGE, PAGE)])
        self.add_region(
            MIGRATION_REGION,
            5 * PAGE,
            read=self.read_bar0,
            write=self.write_bar0,
            region_type=RegionType(3, 1),
        )
        self.add_intx(automask=False)

    async def read_bar0(self, offset: int, size: int) -> bytes:
        return self.bar0[:size]

    async def write_bar0(self, offset: int, data: bytes) -> None:
        self.bar0 = data[:8]


async def test_samples_client_drives_our_server_until_protocol_0_1_dirty_pages(
    built: Samples, tmp_path: Path
) -> None:
    """samples/client (protocol 0.1) negotiates with our server and goes through every
    step it shares with 0.2: a bogus region is EINVAL, device info, each region's info
    re-sent with its whole buffer, config space ids, reset, DMA_MAP of a temporary file
    page by page, IRQ info and an INTx eventfd. It then asks to start dirty logging with
    DIRTY_PAGES (command 14), which protocol 0.2 replaced by DEVICE_FEATURE: EINVAL, as
    libvfio-user answers an unknown command, and the sample exits there."""
    device = SamplesServerTwin()
    tracer = Tracer()
    path = tmp_path / "twin.sock"
    log = tmp_path / "client.log"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, device, path, hooks=tracer))
            with open(log, "wb") as out:
                with trio.fail_after(TIMER_TIMEOUT):
                    result = await trio.run_process(
                        [built["client"], path], stdout=out, stderr=subprocess.STDOUT, check=False
                    )
            nursery.cancel_scope.cancel()
    finally:
        device.close()
    output = log.read_text()
    assert result.returncode == 1, output
    for line in (
        "client: devinfo: flags 0x3, num_regions 10, num_irqs 5",
        # The bogus-region probe, answered EINVAL as the sample requires.
        "client: failed to read from region -559038737 0-0x3: Invalid argument",
        # One fd for both sparse areas (libvfio-user sends one per area; either is valid).
        "client: get_device_region_info: region_info[1] offset 0 flags 0xf size 16384 "
        "cap_sz 48 #FDs 1",
        "client: get_region_vfio_caps: area 1 offset 0x2000 size 4096",
        "client: migration region",
        "client: IRQ INTx: count=1 flags=0x3",  # EVENTFD | MASKABLE, no AUTOMASKED
        "failed to start dirty page logging: Invalid argument",
    ):
        assert line in output, output
    # Everything before DIRTY_PAGES was answered; DIRTY_PAGES alone refused.
    refused = [(r.command, r.errno) for r in tracer.errors()]
    assert refused == [(Command.REGION_READ, errno.EINVAL), (14, errno.EINVAL)]
    maps = tracer.commands(Command.DMA_MAP)
    # Twice the server's max_msg_fds maps, one page each, all of one temporary file.
    max_fds = DEFAULT_SERVER_CAPABILITIES.max_msg_fds
    assert len(maps) == 2 * max_fds and all(r.fd_count == 1 for r in maps)
    assert tracer.commands(Command.DEVICE_RESET)


async def test_migrate_between_samples_servers_stops_at_the_first_device_feature(
    built: Samples, tmp_path: Path
) -> None:
    """This samples/server migrates through its region 9 (VFIO migration v1); migrate()
    speaks v2 (DEVICE_FEATURE, MIG_DATA_READ/WRITE), so the check of the source fails
    cleanly: exit 1 naming the step and the command, no traceback, nothing half done."""
    async with (
        sample_server(built, tmp_path, tag="source") as source,
        sample_server(built, tmp_path, tag="destination") as destination,
    ):
        result = await trio.run_process(
            [*CLI, "migrate", os.fspath(source.socket), os.fspath(destination.socket)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "check failed on the source: [EINVAL] Invalid argument (DEVICE_FEATURE)" in err
    assert "Traceback" not in err
    assert "bad command 16" in source.output()
    assert "migration: transition" not in source.output()


async def test_gpio_sample_serves_clients_in_turn_and_lspci_gives_up_while_busy(
    built: Samples, tmp_path: Path
) -> None:
    """samples/gpio-pci-idio-16 (the device our gpio example also is) serves one client at a
    time and takes the next when it leaves, keeping its state. Meanwhile a new client's
    VERSION is never answered (its connection waits in the backlog), which `lspci --timeout`
    reports in one line instead of hanging. That client having gone, the sample's next
    re-attach answers a closed socket and the sample exits ("failed to re-attach device")."""
    async with sample_server(built, tmp_path, name="gpio-pci-idio-16", tag="gpio") as gpio:
        async with connect(await connect_socket(gpio.socket)) as client:
            header = await client.config.header()
            assert (header.vendor_id, header.device_id) == (0x494F, 0x0DC8)
            assert client.regions[PciRegion.BAR2].size == 0x100
            # Its input register counts reads (each value three times).
            values = [(await client.read(PciRegion.BAR2, 0, 1))[0] for _ in range(6)]
            assert values == [0, 0, 0, 1, 1, 1]
        async with connect(await connect_socket(gpio.socket)) as client:
            assert (await client.read(PciRegion.BAR2, 0, 1))[0] == 2  # the next client
            busy = await trio.run_process(
                [*CLI, "lspci", "--timeout", "1", os.fspath(gpio.socket)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert (await client.read(PciRegion.BAR2, 0, 1))[0] == 2  # still ours
        with trio.fail_after(TIMER_TIMEOUT):
            await gpio.process.wait()
    err = busy.stderr.decode()
    assert busy.returncode == 1 and busy.stdout == b""
    assert err.endswith(
        f"vfio-user-trio lspci: {gpio.socket}: [ETIMEDOUT] no answer to VERSION within 1 s\n"
    )
    assert "Traceback" not in err
    assert gpio.process.returncode == 1
    assert "failed to re-attach device" in gpio.output()
