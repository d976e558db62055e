"""Nested devices: twin socket on and off, socket paths, teardown, the fd-leak check."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest
import trio

from tests.nested_fetcher import Fetcher
from vfiouser_trio.client import GuestMemory, VfioUserError, connect
from vfiouser_trio.engine import Link
from vfiouser_trio.protocol import DmaReadReply, DmaReadRequest, PciRegion
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.testing import Direction, FdLeakError, Tracer, nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

IOVA = 0x10000


@pytest.mark.parametrize("twin", [True, False], ids=["twin", "single"])
async def test_device_dma_travels_on_the_twin_socket_only_when_negotiated(twin: bool) -> None:
    device = Fetcher()
    with GuestMemory(0x1000) as memory, trio.fail_after(5):
        memory.write(0x20, b"abcd")
        async with nested_device(device, twin_socket=twin) as pair:
            assert pair.client.twin_socket is twin
            await pair.client.dma_map(memory, IOVA, share_fd=False)  # DMA by message
            await pair.client.write(PciRegion.BAR0, 0, struct.pack("<Q", IOVA + 0x20))
            assert await pair.client.read(PciRegion.BAR0, 8, 4) == b"abcd"
    (request,) = pair.tracer.commands(Command.DMA_READ)
    (reply,) = pair.tracer.replies(Command.DMA_READ)
    expected_link = Link.TWIN if twin else Link.MAIN
    assert (request.link, request.direction) == (expected_link, Direction.RECEIVED)
    assert (reply.link, reply.direction) == (expected_link, Direction.SENT)
    assert request.decode() == DmaReadRequest(IOVA + 0x20, 4)
    decoded = reply.decode()
    assert isinstance(decoded, DmaReadReply) and decoded.data == b"abcd"
    assert reply.request is request


async def test_the_test_reaches_the_device_object_itself() -> None:
    device = Fetcher()
    with trio.fail_after(5):
        async with nested_device(device) as pair:
            assert pair.device is device and device.attaches == 1
            device.regs[8:12] = b"\x01\x02\x03\x04"
            assert await pair.client.read(PciRegion.BAR0, 8, 4) == b"\x01\x02\x03\x04"
            await pair.client.write(PciRegion.BAR0, 12, b"\xff")
            assert device.regs[12] == 0xFF
            assert device.detaches == 0
    # Leaving waited for the device to see its client go.
    assert device.detaches == 1 and pair.client.closed


async def test_a_shared_fd_map_is_gone_from_the_device_after_exit() -> None:
    device = Fetcher()
    with GuestMemory(0x1000) as memory, trio.fail_after(5):
        async with nested_device(device) as pair:
            await pair.client.dma_map(memory, IOVA)  # the device holds a copy of the memfd
            assert len(device.dma) == 1
        assert len(device.dma) == 0  # and its fd is closed, or the check would have failed


async def test_path_mode_serves_on_a_temporary_socket_file() -> None:
    with trio.fail_after(5):
        async with nested_device(Fetcher(), path=True) as pair:
            assert pair.path is not None
            assert stat.S_ISSOCK(os.stat(pair.path).st_mode)
            assert await pair.client.read(PciRegion.BAR0, 0, 4) == bytes(4)
            with pytest.raises(VfioUserError) as info:
                async with connect(pair.path):
                    pass
            assert info.value.errno == errno.EBUSY  # one client per device, as serve() does
            socket_dir = os.path.dirname(pair.path)
        assert not os.path.exists(socket_dir)
        async with nested_device(Fetcher()) as pair:
            assert pair.path is None


async def test_a_tracer_passed_in_is_used() -> None:
    tracer = Tracer()
    with trio.fail_after(5):
        async with nested_device(Fetcher(), tracer=tracer) as pair:
            assert pair.tracer is tracer
    assert tracer.commands()[0].command == Command.VERSION


async def test_an_exception_from_the_body_propagates_unwrapped() -> None:
    device = Fetcher()
    with trio.fail_after(5), pytest.raises(KeyError):
        async with nested_device(device):
            raise KeyError("from the test")
    assert device.detaches == 1


# --------------------------------------------------------------------------- fd leaks


async def test_the_leak_check_detects_an_fd_left_open_in_the_body() -> None:
    leaked = -1
    with trio.fail_after(5), pytest.raises(FdLeakError) as info:
        async with nested_device(Fetcher()):
            leaked = os.memfd_create("leaked-on-purpose")
    os.close(leaked)
    assert list(info.value.leaked) == [leaked]
    assert "memfd:leaked-on-purpose" in str(info.value)


class LeakyDevice(Fetcher):
    """Opens an eventfd when a client attaches and never closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fds: list[int] = []

    async def attached(self) -> None:
        self.fds.append(os.eventfd(0))


async def test_the_leak_check_detects_a_device_that_leaks() -> None:
    device = LeakyDevice()
    with trio.fail_after(5), pytest.raises(FdLeakError) as info:
        async with nested_device(device):
            pass
    assert list(info.value.leaked) == device.fds
    for fd in device.fds:
        os.close(fd)


async def test_the_leak_check_can_be_turned_off() -> None:
    device = LeakyDevice()
    with trio.fail_after(5):
        async with nested_device(device, check_fds=False):
            pass
    assert len(device.fds) == 1
    os.close(device.fds[0])
