"""The server over real sockets, driven by the raw engine client of tests/raw_client.py.

Checks reply sizes and errnos against the spec and libvfio-user's answers, DMA through fd
maps and through messages, unmap waiting for device DMA, disconnect cleanup,
the one-client-per-device rule, the socket file, and fd leaks.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import socket
import stat
import struct
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from tests.raw_client import GuestRam, expect_raw_errno, raw_payload, session
from vfiouser_trio.engine import open_connection
from vfiouser_trio.ordering import ConcurrentOrder
from vfiouser_trio.protocol import (
    Capabilities,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetRequest,
    DmaMapRequest,
    DmaUnmapRequest,
    IrqInfoReply,
    IrqInfoRequest,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionTypeCap,
    RegionWriteEntry,
    RegionWriteMultiRequest,
    RegionWriteRequest,
    SetIrqsRequest,
    VersionReply,
    VersionRequest,
)
from vfiouser_trio.protocol.constants import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    Command,
    PciIrq,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.pci_caps import PowerManagementCapability, VendorCapability
from vfiouser_trio.server.regions import RegionType, SparseArea
from vfiouser_trio.server.serve import DeviceServer, serve, serve_connection
from vfiouser_trio.server.session import DEFAULT_SERVER_CAPABILITIES

RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
PAGE = mmap.PAGESIZE


class Probe(Device):
    """BAR0 registers: 0x0 scratch, 0x8 'copy' (DMA 16 bytes from iova at 0x10 to 0x18)."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10FF, class_code=0xFF0000))
        self.regs = bytearray(0x100)
        self.add_bar(0, 0x100, read=self.read0, write=self.write0)
        self.add_bar(1, 0x4000, sparse=[SparseArea(0x1000, 0x1000)])
        self.add_bar(2, 0x1000)
        self.add_msix(2, bar=2)
        self.add_capability(PowerManagementCapability())
        self.add_capability(VendorCapability(b"hello"))
        self.bell = self.add_doorbell(0, 0x40)
        self.dma_gate: trio.Event | None = None
        self.resets = 0
        self.attach_count = 0

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(self.regs[offset : offset + size])

    async def write0(self, offset: int, data: bytes) -> None:
        self.regs[offset : offset + len(data)] = data
        if offset == 0x8:
            src, dst = struct.unpack_from("<QQ", self.regs, 0x10)
            # Pinned: an unmap of either range waits for the whole copy.
            with self.dma.pin(src, 16), self.dma.pin(dst, 16, write=True):
                payload = await self.dma.read(src, 16)
                if self.dma_gate is not None:
                    await self.dma_gate.wait()
                await self.dma.write(dst, payload[::-1])

    async def reset(self) -> None:
        self.resets += 1
        self.regs[:] = bytes(len(self.regs))

    async def attached(self) -> None:
        self.attach_count += 1


# --- negotiation and info --------------------------------------------------------------


async def test_version_first_and_only_once() -> None:
    device = Probe()
    client_sock, server_sock = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, device, server_sock)
        async with open_connection(client_sock, handler=GuestRam(0, 0).handle) as conn:
            await expect_raw_errno(
                conn, Command.DEVICE_GET_INFO, DeviceGetInfoRequest().pack(), errno.EINVAL
            )
            await expect_raw_errno(conn, Command.VERSION, struct.pack("=HH", 1, 0), errno.EINVAL)
            reply = await conn.request(VersionRequest(0, 5))
            assert isinstance(reply, VersionReply) and (reply.major, reply.minor) == (0, 2)
            caps = reply.effective_capabilities
            assert caps.max_data_xfer_size == 1 << 20 and caps.twin_socket is None
            await expect_raw_errno(conn, Command.VERSION, VersionRequest().pack(), errno.EINVAL)
    device.close()


async def test_device_region_and_irq_info_sizes() -> None:
    device = Probe()
    async with session(device) as conn:
        payload = await raw_payload(conn, DeviceGetInfoRequest())
        assert len(payload) == 16
        info = DeviceGetInfoReply.unpack(payload)
        assert info.is_pci and info.supports_reset
        assert (info.num_regions, info.num_irqs) == (9, 5)
        assert len(await raw_payload(conn, IrqInfoRequest(PciIrq.MSIX))) == 16
        msix = await conn.request(IrqInfoRequest(PciIrq.MSIX))
        assert isinstance(msix, IrqInfoReply) and msix.count == 2
        await expect_raw_errno(
            conn, Command.DEVICE_GET_IRQ_INFO, IrqInfoRequest(5).pack(), errno.EINVAL
        )
        # Region info: plain BAR is 32 bytes; config space is 256 bytes read/write.
        bar0 = await conn.request(RegionInfoRequest(0))
        assert isinstance(bar0, RegionInfoReply) and bar0.size == 0x100 and not bar0.mmappable
        config = await conn.request(RegionInfoRequest(7))
        assert isinstance(config, RegionInfoReply) and config.size == 256
        absent = await conn.request(RegionInfoRequest(5))
        assert isinstance(absent, RegionInfoReply) and absent.size == 0 and absent.flags == 0
        await expect_raw_errno(
            conn, Command.DEVICE_GET_REGION_INFO, RegionInfoRequest(9).pack(), errno.EINVAL
        )
    device.close()


async def test_sparse_region_info_with_and_without_room_for_caps() -> None:
    device = Probe()
    async with session(device) as conn:
        # argsz too small for the caps: 32 bytes, needed size in argsz, no CAPS flag, no fd.
        short = await raw_payload(conn, RegionInfoRequest(1, argsz=32))
        assert len(short) == 32
        argsz, flags = struct.unpack_from("=II", short)
        assert argsz > 32 and not flags & 0x8
        full = await conn.request(RegionInfoRequest(1, argsz=argsz))
        assert isinstance(full, RegionInfoReply) and full.mmappable and full.fd is not None
        sparse = full.sparse_mmap
        assert sparse is not None and [(a.offset, a.size) for a in sparse.areas] == [
            (0x1000, 0x1000)
        ]
        # The fd maps the region: a write through the mapping is visible to REGION_READ.
        with mmap.mmap(full.fd, 0x4000, offset=full.offset) as view:
            view[0x1000:0x1004] = b"mmap"
        os.close(full.fd)
        reply = await conn.request(RegionReadRequest(1, 0x1000, 4))
        assert isinstance(reply, RegionReadReply) and reply.data == b"mmap"
    device.close()


# --- region access ---------------------------------------------------------------------


async def test_region_read_write_sizes_and_errors() -> None:
    device = Probe()
    async with session(device) as conn:
        write = RegionWriteRequest(0, 0x20, b"\x01\x02\x03\x04")
        payload = await raw_payload(conn, write)
        assert payload == struct.pack("=QII", 0x20, 0, 4)  # 16-byte echo, no data
        payload = await raw_payload(conn, RegionReadRequest(0, 0x20, 4))
        assert payload == struct.pack("=QII", 0x20, 0, 4) + b"\x01\x02\x03\x04"
        assert len(await raw_payload(conn, RegionReadRequest(0, 0, 0))) == 16  # count 0 works
        bad = [
            (Command.REGION_READ, RegionReadRequest(0, 0xFE, 4).pack()),  # past the end
            (Command.REGION_READ, RegionReadRequest(0, 2**64 - 2, 4).pack()),  # would wrap
            (Command.REGION_READ, RegionReadRequest(12, 0, 4).pack()),  # no such region
            (Command.REGION_READ, RegionReadRequest(0, 0, (1 << 20) + 1).pack()),  # > max xfer
            (Command.REGION_READ, struct.pack("=QI", 0, 0)),  # payload < 16
            (Command.REGION_WRITE, struct.pack("=QII", 0, 0, 4) + b"ab"),  # data != count
            (Command.REGION_WRITE, RegionWriteRequest(7, 0, b"\x00\x00").pack()),  # vendor ID
        ]
        for command, raw in bad:
            await expect_raw_errno(conn, command, raw, errno.EINVAL)
        # The connection is still fine after all those errors.
        assert (await raw_payload(conn, RegionReadRequest(0, 0x20, 1)))[16:] == b"\x01"
    device.close()


async def test_config_space_bar_sizing_and_capability_chain() -> None:
    device = Probe()
    async with session(device) as conn:

        async def cfg(offset: int, n: int) -> int:
            reply = await conn.request(RegionReadRequest(7, offset, n))
            assert isinstance(reply, RegionReadReply)
            return int.from_bytes(reply.data, "little")

        assert await cfg(0, 4) == 0x10FF1AF4
        await conn.request(RegionWriteRequest(7, 0x14, b"\xff\xff\xff\xff"))
        assert await cfg(0x14, 4) == 0xFFFFC000  # BAR1: 16 KiB memory
        ids = []
        pointer = await cfg(0x34, 1)
        while pointer:
            ids.append(await cfg(pointer, 1))
            pointer = await cfg(pointer + 1, 1)
        assert sorted(ids) == [0x01, 0x09, 0x11]  # PM, vendor-specific, MSI-X
        with pytest.raises(VfioUserError) as exc:
            await conn.request(RegionWriteRequest(7, 0x40, b"\x00"))  # a capability ID byte
        assert exc.value.errno == errno.EPERM
    device.close()


async def test_write_multi_when_negotiated() -> None:
    device = Probe()
    client_sock, server_sock = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, device, server_sock)
        async with open_connection(client_sock, handler=GuestRam(0, 0).handle) as conn:
            multi = RegionWriteMultiRequest(
                (RegionWriteEntry(0, 0x30, b"ab"), RegionWriteEntry(0, 0x38, b"cd"))
            )
            await conn.request(VersionRequest(0, 2, Capabilities(write_multiple=False)))
            await expect_raw_errno(conn, Command.REGION_WRITE_MULTI, multi.pack(), errno.EINVAL)
    client_sock, server_sock = socket.socketpair()
    offered = dataclasses.replace(DEFAULT_SERVER_CAPABILITIES, write_multiple=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_connection, device, server_sock, capabilities=offered))
        async with open_connection(client_sock, handler=GuestRam(0, 0).handle) as conn:
            await conn.request(VersionRequest(0, 2, Capabilities(write_multiple=True)))
            assert await raw_payload(conn, multi) == struct.pack("=Q", 2)
            assert device.regs[0x30:0x32] == b"ab" and device.regs[0x38:0x3A] == b"cd"
    device.close()


# --- interrupts and doorbells ------------------------------------------------------------


async def test_set_irqs_delivers_and_rejects_bad_requests() -> None:
    device = Probe()
    async with session(device) as conn:
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
        assert (
            await raw_payload(conn, SetIrqsRequest(PciIrq.MSIX, flags, 0, 2, fds=tuple(fds))) == b""
        )
        assert device.trigger(1, index=PciIrq.MSIX)
        assert os.eventfd_read(fds[1]) == 1
        before = fd_count()
        extra = os.eventfd(0, os.EFD_CLOEXEC)
        with pytest.raises(VfioUserError) as exc:  # beyond the IRQ count: fd closed by server
            await conn.request(SetIrqsRequest(PciIrq.MSIX, flags, 2, 1, fds=(extra,)))
        assert exc.value.errno == errno.EINVAL
        os.close(extra)
        assert fd_count() == before
        for fd in fds:
            os.close(fd)
    device.close()


async def test_doorbell_fds_ring_the_device() -> None:
    device = Probe()
    async with session(device) as conn:
        reply = await conn.request(RegionIoFdsRequest(0, argsz=16 + 40))
        assert isinstance(reply, RegionIoFdsReply) and reply.count == 1 and len(reply.fds) == 1
        sub = reply.sub_regions[0]
        assert (sub.offset, sub.size) == (0x40, 4)
        short = await raw_payload(conn, RegionIoFdsRequest(0, argsz=16))
        assert len(short) == 16 and struct.unpack_from("=I", short)[0] == 56  # argsz = needed
        os.eventfd_write(reply.fds[0], 1)
        with trio.fail_after(5):
            assert await device.bell.wait() == 1
        os.close(reply.fds[0])
    device.close()


# --- DMA ---------------------------------------------------------------------------------


async def test_dma_through_fd_map_and_unmap_replies() -> None:
    device = Probe()
    async with session(device) as conn:
        fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 * PAGE)
        guest = mmap.mmap(fd, 2 * PAGE)
        assert await raw_payload(conn, DmaMapRequest(0x100000, 2 * PAGE, RW, fds=(fd,))) == b""
        os.close(fd)
        guest[0:16] = bytes(range(16))
        await conn.request(RegionWriteRequest(0, 0x10, struct.pack("<QQ", 0x100000, 0x100100)))
        await conn.request(RegionWriteRequest(0, 0x8, b"\x01"))
        assert guest[0x100:0x110] == bytes(range(16))[::-1]
        await expect_raw_errno(
            conn, Command.DMA_MAP, DmaMapRequest(0x100000, PAGE, RW).pack(), errno.EEXIST
        )
        await expect_raw_errno(
            conn, Command.DMA_UNMAP, DmaUnmapRequest(0x100000, PAGE).pack(), errno.ENOENT
        )
        unmap = DmaUnmapRequest(0x100000, 2 * PAGE)
        assert await raw_payload(conn, unmap) == unmap.pack()  # 24-byte echo
        assert len(device.dma) == 0
        guest.close()
    device.close()


@pytest.mark.parametrize("twin", [False, True])
async def test_dma_through_messages_inside_a_region_write(twin: bool) -> None:
    # The deadlock case: the REGION_WRITE handler waits on DMA_READ/WRITE replies.
    device = Probe()
    ram = GuestRam(0x200000, PAGE)
    ram.mem[0:16] = b"0123456789abcdef"
    async with session(device, twin=twin, ram=ram) as conn:
        await conn.request(DmaMapRequest(0x200000, PAGE, RW))
        await conn.request(RegionWriteRequest(0, 0x10, struct.pack("<QQ", 0x200000, 0x200800)))
        with trio.fail_after(10):
            await conn.request(RegionWriteRequest(0, 0x8, b"\x01"))
        assert bytes(ram.mem[0x800:0x810]) == b"fedcba9876543210"
        assert ram.requests == [Command.DMA_READ, Command.DMA_WRITE]
    device.close()


async def test_unmap_waits_for_in_flight_device_dma() -> None:
    device = Probe()
    device.dma_gate = trio.Event()
    ram = GuestRam(0x300000, PAGE)
    # Data no layout reads alike, so the DMA_READ reply tells the client's layout (no probe).
    ram.mem[:] = b"\xa5" * PAGE
    # Under the spec's ordering the unmap would simply queue behind the write; a concurrent
    # policy lets it reach the DMA table while the copy is in flight.
    async with session(device, ram=ram, policy=ConcurrentOrder()) as conn:
        await conn.request(DmaMapRequest(0x300000, PAGE, RW))
        await conn.request(RegionWriteRequest(0, 0x10, struct.pack("<QQ", 0x300000, 0x300040)))
        unmapped = trio.Event()
        async with trio.open_nursery() as nursery:

            async def kick() -> None:
                await conn.request(RegionWriteRequest(0, 0x8, b"\x01"))

            async def unmap() -> None:
                await conn.request(DmaUnmapRequest(0x300000, PAGE))
                unmapped.set()

            nursery.start_soon(kick)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(unmap)
            await trio.testing.wait_all_tasks_blocked()
            # The copy is parked half-way (read done, write pending): unmap must not finish.
            assert not unmapped.is_set()
            device.dma_gate.set()
        assert unmapped.is_set()
        assert ram.requests == [Command.DMA_READ, Command.DMA_WRITE]
    device.close()


async def test_unmap_all_and_map_limits() -> None:
    device = Probe()
    async with session(device) as conn:
        for i in range(3):
            await conn.request(DmaMapRequest(i * PAGE, PAGE, DMA_MAP_FLAG_READ))
        payload = await raw_payload(conn, DmaUnmapRequest(0, 0, DMA_UNMAP_FLAG_ALL))
        assert len(payload) == 24
        assert len(device.dma) == 0
        await expect_raw_errno(
            conn,
            Command.DMA_UNMAP,
            struct.pack("=IIQQ", 24, DMA_UNMAP_FLAG_ALL, 0, PAGE),
            errno.EINVAL,
        )
        await expect_raw_errno(
            conn, Command.DMA_MAP, struct.pack("=IIQQQ", 24, RW, 0, 0, PAGE), errno.EINVAL
        )
    device.close()


# --- reset, disconnect, serving -----------------------------------------------------------


async def test_reset_calls_the_hook_and_restores_config() -> None:
    device = Probe()
    async with session(device) as conn:
        await conn.request(RegionWriteRequest(7, 0x4, b"\x06\x00"))
        assert device.config.command == 6
        assert await raw_payload(conn, DeviceResetRequest()) == b""
        assert device.resets == 1 and device.config.command == 0
    device.close()


async def test_disconnect_drops_maps_and_irq_fds_but_keeps_state() -> None:
    device = Probe()
    before = fd_count()
    async with session(device) as conn:
        fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGE)
        await conn.request(DmaMapRequest(0, PAGE, RW, fds=(fd,)))
        os.close(fd)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        await conn.request(
            SetIrqsRequest(
                PciIrq.MSIX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1, fds=(efd,)
            )
        )
        os.close(efd)
        await conn.request(RegionWriteRequest(0, 0x0, b"kept"))
    with trio.fail_after(5):
        while len(device.dma) or device.irqs[PciIrq.MSIX].has_eventfd(0):
            await trio.testing.wait_all_tasks_blocked()
    assert fd_count() == before
    async with session(device) as conn:
        reply = await conn.request(RegionReadRequest(0, 0, 4))
        assert isinstance(reply, RegionReadReply) and reply.data == b"kept"
    assert device.attach_count == 2
    device.close()


async def test_serve_on_path_one_client_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "probe.sock"
    (tmp_path / "not-a-socket").write_text("x")
    device = Probe()
    with pytest.raises(Exception, match="not a socket"):
        await serve(device, tmp_path / "not-a-socket")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, device, path)
        assert isinstance(server, DeviceServer)
        assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o600
        async with open_connection(_connect(path), handler=GuestRam(0, 0).handle) as conn:
            await conn.request(VersionRequest())
            second = _connect(path)
            async with open_connection(second, handler=GuestRam(0, 0).handle) as other:
                with pytest.raises(VfioUserError) as exc:
                    await other.request(VersionRequest())
                assert exc.value.errno == errno.EBUSY
            reply = await conn.request(RegionReadRequest(0, 0, 1))
            assert isinstance(reply, RegionReadReply)
        nursery.cancel_scope.cancel()
    assert not path.exists()
    device.close()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(path))
    return sock


async def test_no_fd_leaks_over_many_sessions() -> None:
    device = Probe()
    async with session(device):
        pass
    before = fd_count()
    for _ in range(100):
        async with session(device) as conn:
            await conn.request(RegionReadRequest(0, 0, 4))
    assert fd_count() == before
    device.close()


class Regions(Device):
    """A ROM, the VGA region and a device-specific region with a type capability."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10FE))
        self.add_rom(0x800, data=b"\x55\xaa")
        self.add_region(8, 0x100, memory=True)
        self.add_region(10, 0x2000, memory=True, mmap=True, region_type=RegionType(0x8086, 3))


async def test_rom_vga_and_device_specific_regions() -> None:
    device = Regions()
    async with session(device) as conn:
        info = await conn.request(DeviceGetInfoRequest())
        assert isinstance(info, DeviceGetInfoReply) and info.num_regions == 11
        rom = await conn.request(RegionInfoRequest(6))
        assert isinstance(rom, RegionInfoReply) and rom.size == 0x800
        assert rom.readable and not rom.writable
        reply = await conn.request(RegionReadRequest(6, 0, 2))
        assert isinstance(reply, RegionReadReply) and reply.data == b"\x55\xaa"
        await expect_raw_errno(
            conn, Command.REGION_WRITE, RegionWriteRequest(6, 0, b"x").pack(), errno.EINVAL
        )
        vga = await conn.request(RegionInfoRequest(8))
        assert isinstance(vga, RegionInfoReply) and vga.size == 0x100
        absent = await conn.request(RegionInfoRequest(9))
        assert isinstance(absent, RegionInfoReply) and absent.size == 0
        special = await conn.request(RegionInfoRequest(10, argsz=512))
        assert isinstance(special, RegionInfoReply) and special.mmappable
        assert special.region_type == RegionTypeCap(0x8086, 3)
        assert special.fd is not None
        os.close(special.fd)
        # The ROM BAR register sizes like hardware: all-ones reads back the size mask.
        await conn.request(RegionWriteRequest(7, 0x30, b"\xff\xff\xff\xff"))
        bar = await conn.request(RegionReadRequest(7, 0x30, 4))
        assert isinstance(bar, RegionReadReply)
        assert int.from_bytes(bar.data, "little") == 0xFFFFF801
    device.close()


async def test_one_device_on_two_paths_still_takes_one_client(tmp_path: Path) -> None:
    device = Probe()
    first_path, second_path = tmp_path / "a.sock", tmp_path / "b.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, device, first_path)
        await nursery.start(serve, device, second_path)
        async with open_connection(_connect(first_path), handler=GuestRam(0, 0).handle) as conn:
            await conn.request(VersionRequest())
            async with open_connection(
                _connect(second_path), handler=GuestRam(0, 0).handle
            ) as other:
                with pytest.raises(VfioUserError) as exc:
                    await other.request(VersionRequest())
                assert exc.value.errno == errno.EBUSY
        # Once the first client is gone, the other path serves the device.
        with trio.fail_after(10):
            while True:
                async with open_connection(
                    _connect(second_path), handler=GuestRam(0, 0).handle
                ) as again:
                    try:
                        await again.request(VersionRequest())
                        break
                    except VfioUserError as error:
                        # The first session may still be tearing down: try once more after it.
                        assert error.errno == errno.EBUSY
                        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    device.close()
