"""Memory a peer can shrink, and fds held per DMA map (issue 9), on both sides.

A SIGBUS kills the process it hits, so every test whose failure would be a SIGBUS runs
its victim in a child process (``run_victim``) and asserts that the child survives.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import signal

import pytest

from tests.e2e_device import SRC, TestDevice, served
from tests.mappings import is_mapped
from tests.victims import assert_survived, run_victim
from vfiouser_trio.client import GuestMemory
from vfiouser_trio.client.regions import Region as ClientRegion
from vfiouser_trio.memory import Prot, create_memfd
from vfiouser_trio.protocol.constants import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.regions import RegionInfoReply
from vfiouser_trio.server.dma import DmaTable
from vfiouser_trio.server.regions import RegionMemory

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = mmap.PAGESIZE
RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE


def frozen_memfd(size: int) -> int:
    """A memfd that can never be sealed (F_SEAL_SEAL from birth), so it can always shrink."""
    fd = os.memfd_create("frozen", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def sealable_memfd(size: int) -> int:
    fd = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


# --- finding 1: the client truncates a DMA file after DMA_MAP -----------------------------

SHRINK_DMA_VICTIM = """
    import errno, logging, mmap, os
    import trio
    from tests.raw_client import session
    from vfiouser_trio.protocol import DmaMapRequest
    from vfiouser_trio.server.device import Device
    from vfiouser_trio.server.dma import DmaError
    from vfiouser_trio.server.pci import PciIdentity

    PAGE = mmap.PAGESIZE
    IOVA = 0x100000
    KIND = {kind!r}
    logging.basicConfig(level=logging.WARNING)

    def shrinkable_fd() -> int:
        if KIND == "tmpfs":  # a plain tmpfs file: no seals at all
            fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)  # unnamed: nothing left
        else:  # a memfd created without MFD_ALLOW_SEALING: seals frozen, no F_SEAL_SHRINK
            fd = os.memfd_create("frozen", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4 * PAGE)
        return fd

    async def main() -> None:
        device = Device(PciIdentity(vendor_id=0x1AF4, device_id=0x10F2))
        fd = shrinkable_fd()
        async with session(device) as conn:
            await conn.request(DmaMapRequest(IOVA, 4 * PAGE, fds=(fd,)))
            await device.dma.write(IOVA, b"before")
            assert await device.dma.read(IOVA, 6) == b"before"
            os.ftruncate(fd, PAGE)  # the client shrinks its memory under the map
            assert await device.dma.read(IOVA, 6) == b"before"  # still inside the file
            for access in (
                device.dma.read(IOVA + 2 * PAGE, 16),
                device.dma.write(IOVA + 3 * PAGE, b"x" * 16),
                device.dma.read(IOVA + PAGE - 8, 16),  # straddles the new end
            ):
                try:
                    await access
                except DmaError as exc:
                    assert exc.errno == errno.EFAULT, exc
                else:
                    raise AssertionError("DMA past the truncated end succeeded")
            try:
                device.dma.view(IOVA, 16)
            except DmaError as exc:
                assert exc.errno == errno.EFAULT and "trust_client_memory" in str(exc), exc
            else:
                raise AssertionError("a zero-copy view of shrinkable memory was allowed")
        os.close(fd)
        device.close()
        print("survived")

    trio.run(main)
"""


@pytest.mark.parametrize("kind", ["frozen-memfd", "tmpfs"])
def test_truncated_dma_file_gives_efault_not_sigbus(kind: str) -> None:
    if kind == "tmpfs" and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    result = run_victim(SHRINK_DMA_VICTIM.format(kind=kind))
    assert_survived(result)
    assert result.stderr.count("shrank the file") == 1, result.stderr  # logged once per map


async def test_dma_map_seals_a_sealable_memfd_against_shrinking() -> None:
    table = DmaTable()
    fd = sealable_memfd(4 * PAGE)
    mine = os.dup(fd)
    table.map(0x1000, 2 * PAGE, RW, fd, offset=PAGE)
    seals = fcntl.fcntl(mine, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and not seals & fcntl.F_SEAL_GROW
    with pytest.raises(PermissionError):
        os.ftruncate(mine, PAGE)
    os.ftruncate(mine, 8 * PAGE)  # growing stays allowed
    (mapping,) = table
    assert not mapping.can_shrink
    with table.view(0x1000, 16, writable=True) as view:  # sealed: zero-copy is fine
        view[:5] = b"hello"
    assert os.pread(mine, 5, PAGE) == b"hello"
    await table.unmap_all()
    os.close(mine)


async def test_dma_map_records_file_identity_offset_and_protection() -> None:
    table = DmaTable()
    fd = sealable_memfd(4 * PAGE)
    st = os.fstat(fd)
    table.map(0x1000, PAGE, DMA_MAP_FLAG_READ, fd, offset=PAGE + 100)
    (mapping,) = table
    assert mapping.file == (st.st_dev, st.st_ino)
    assert mapping.fd_offset == PAGE + 100
    assert mapping.prot == Prot.READ
    await table.unmap_all()


@pytest.mark.parametrize("where", ["past-end", "offset-past-end"])
def test_dma_map_past_the_end_of_the_file_is_einval(where: str) -> None:
    table = DmaTable()
    fd = sealable_memfd(2 * PAGE)
    size, offset = (3 * PAGE, 0) if where == "past-end" else (PAGE, 2 * PAGE)
    with pytest.raises(VfioUserError) as info:
        table.map(0x1000, size, RW, fd, offset=offset)  # closes fd
    assert info.value.errno == errno.EINVAL
    assert len(table) == 0


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_dma_map_of_a_device_node_is_einval(path: str) -> None:
    # /dev/zero maps fine with mmap, but it is not guest memory.
    table = DmaTable()
    with pytest.raises(VfioUserError) as info:
        table.map(0x1000, PAGE, RW, os.open(path, os.O_RDWR))
    assert info.value.errno == errno.EINVAL
    assert len(table) == 0


async def test_a_trusted_client_gets_views_of_shrinkable_memory() -> None:
    table = DmaTable()
    table.trust_client_memory = True
    table.map(0x1000, PAGE, RW, frozen_memfd(PAGE))
    (mapping,) = table
    assert mapping.can_shrink
    with table.view(0x1000, 4, writable=True) as view:
        view[:] = b"abcd"
    assert await table.read(0x1000, 4) == b"abcd"
    await table.unmap_all()


async def test_unmap_while_a_device_still_holds_a_slice_keeps_the_memory_mapped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = DmaTable()
    table.map(0x1000, PAGE, RW, sealable_memfd(PAGE))
    (mapping,) = table
    with table.view(0x1000, 16, writable=True) as view:
        kept = view[4:12]  # a device bug: a slice kept past the view's context
    address = mapping._mapping.address if mapping._mapping is not None else 0
    with caplog.at_level(logging.WARNING, logger="vfiouser_trio.server.dma"):
        await table.unmap_all()
    assert "still exported" in caplog.text
    assert len(table) == 0
    kept[:] = b"12345678"  # still mapped: no use after unmap
    assert is_mapped(address)
    kept.release()
    assert not is_mapped(address)  # gone with the last slice


# --- the guard itself: only faults inside a guarded copy are caught -----------------------

GUARD_VICTIM = """
    import errno, faulthandler, mmap, os
    from vfiouser_trio.memory import Mapping

    PAGE = mmap.PAGESIZE
    MODE = {mode!r}
    if MODE == "faulthandler-first":
        faulthandler.enable()
    fd = os.memfd_create("victim", os.MFD_CLOEXEC)
    os.ftruncate(fd, 2 * PAGE)
    guarded = Mapping(fd, 2 * PAGE)
    plain = mmap.mmap(fd, 2 * PAGE)  # for an unguarded access later
    assert guarded.load(0, 4) == bytes(4)  # installs the guard
    if MODE == "faulthandler-after":
        faulthandler.enable()
    os.ftruncate(fd, PAGE)
    try:
        guarded.load(PAGE, 16)
    except OSError as exc:
        assert exc.errno == errno.EFAULT
    else:
        raise AssertionError("a guarded load past the end succeeded")
    try:
        guarded.store(PAGE, b"x" * 16)
    except OSError as exc:
        assert exc.errno == errno.EFAULT
    else:
        raise AssertionError("a guarded store past the end succeeded")
    print("guarded copies survived", flush=True)
    if MODE != "faulthandler-after":
        plain[PAGE]  # an unguarded access: a real crash must still crash
    print("survived")
"""


@pytest.mark.parametrize("mode", ["plain", "faulthandler-first"])
def test_a_sigbus_outside_a_guarded_copy_still_kills(mode: str) -> None:
    result = run_victim(GUARD_VICTIM.format(mode=mode))
    assert "guarded copies survived" in result.stdout, result.stderr
    assert result.returncode == -signal.SIGBUS, result.stderr
    if mode == "faulthandler-first":  # chained to the handler that was there before ours
        assert "Bus error" in result.stderr


def test_faulthandler_enabled_after_the_guard_does_not_break_it() -> None:
    assert_survived(run_victim(GUARD_VICTIM.format(mode="faulthandler-after")))


THREAD_VICTIM = """
    import errno, mmap, os, threading
    from vfiouser_trio.memory import Mapping

    PAGE = mmap.PAGESIZE
    fd = os.memfd_create("victim", os.MFD_CLOEXEC)
    os.ftruncate(fd, 2 * PAGE)
    mapping = Mapping(fd, 2 * PAGE)
    os.ftruncate(fd, PAGE)
    errors = []

    def worker() -> None:  # each thread has its own guard state
        for _ in range(100):
            try:
                mapping.load(PAGE, 8)
            except OSError as exc:
                errors.append(exc.errno)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [errno.EFAULT] * 400, errors
    print("survived")
"""


def test_guarded_copies_fault_safely_in_any_thread() -> None:
    assert_survived(run_victim(THREAD_VICTIM))


# --- finding 4: no fd held per DMA map ----------------------------------------------------

FD_VICTIM = """
    import os, resource, mmap
    import trio
    from tests.raw_client import session
    from vfiouser_trio.protocol import DmaMapRequest, DeviceGetInfoRequest
    from vfiouser_trio.server.device import Device
    from vfiouser_trio.server.pci import PciIdentity

    LIMIT, MAPS = 256, 1000
    PAGE = mmap.PAGESIZE
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def device() -> Device:
        return Device(PciIdentity(vendor_id=0x1AF4, device_id=0x10F2))

    async def main() -> None:
        first, second = device(), device()
        memfd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, MAPS * PAGE)
        async with session(first) as conn:
            before = fds()
            for i in range(MAPS):
                fd = os.dup(memfd)
                try:
                    await conn.request(
                        DmaMapRequest(0x1000_0000 + i * PAGE, PAGE, offset=i * PAGE, fds=(fd,))
                    )
                finally:
                    os.close(fd)
            assert len(first.dma) == MAPS
            assert fds() == before, (before, fds())
            await first.dma.write(0x1000_0000 + (MAPS - 1) * PAGE, b"last")
            assert os.pread(memfd, 4, (MAPS - 1) * PAGE) == b"last"
            async with session(second) as other:  # a new connection to the same process
                await other.request(DeviceGetInfoRequest())
        os.close(memfd)
        first.close()
        second.close()
        print("survived")

    trio.run(main)
"""


def test_more_fd_backed_dma_maps_than_the_fd_limit() -> None:
    assert_survived(run_victim(FD_VICTIM))


# --- finding 2: the server's own region memfds are sealed ---------------------------------

REGION_VICTIM = """
    import os
    import trio
    from tests.raw_client import session
    from vfiouser_trio.protocol import RegionInfoRequest, RegionReadRequest
    from vfiouser_trio.protocol.regions import RegionInfoReply
    from vfiouser_trio.server.device import Device
    from vfiouser_trio.server.pci import PciIdentity

    async def main() -> None:
        device = Device(PciIdentity(vendor_id=0x1AF4, device_id=0x10F2))
        device.add_bar(0, 0x4000, memory=True, mmap=True)
        async with session(device) as conn:
            info = await conn.request(RegionInfoRequest(0))
            assert isinstance(info, RegionInfoReply) and len(info.fds) == 1
            try:
                os.ftruncate(info.fds[0], 0)  # a hostile client shrinks the region
            except PermissionError:
                pass
            os.close(info.fds[0])
            reply = await conn.request(RegionReadRequest(0, 0x3000, 8))
            assert reply.data == bytes(8)
        device.close()
        print("survived")

    trio.run(main)
"""


def test_a_client_cannot_shrink_the_servers_region_memory() -> None:
    assert_survived(run_victim(REGION_VICTIM))


def test_region_memory_is_sealed_before_its_fd_is_handed_out() -> None:
    memory = RegionMemory("sealed", 4 * PAGE)
    seals = fcntl.fcntl(memory.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    memory.view[:4] = b"rw ok"[:4]  # the contents stay writable
    memory.close()


# --- finding 3: the client against a server that shrinks its region memory ----------------

HOSTILE_SERVER_VICTIM = """
    import os, mmap
    import trio
    from tests.mappings import ShrinkableMemory
    from tests.e2e_device import TestDevice, served
    from vfiouser_trio.protocol.constants import PciRegion

    PAGE = mmap.PAGESIZE

    async def main() -> None:
        device = TestDevice()
        region = device.region(PciRegion.BAR1)
        region.memory.close()
        region.memory = ShrinkableMemory(region.size)
        region.memory.view[:5] = b"hello"
        async with served(device) as (client, _):
            os.ftruncate(region.memory.fd, 0)  # the server shrinks its region file
            assert await client.read(PciRegion.BAR1, 0, 5) == b"hello"
            await client.write(PciRegion.BAR1, 2 * PAGE, b"world")
            assert bytes(region.memory.view[2 * PAGE : 2 * PAGE + 5]) == b"world"
        print("survived")

    trio.run(main)
"""


def test_a_server_shrinking_its_region_file_does_not_kill_the_client() -> None:
    assert_survived(run_victim(HOSTILE_SERVER_VICTIM))


def _region_reply(fd: int, size: int) -> RegionInfoReply:
    flags = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_MMAP
    return RegionInfoReply(index=1, flags=flags, size=size, fds=(fd,))


def test_client_views_a_region_file_only_when_it_cannot_shrink(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="vfiouser_trio.client.regions"):
        frozen = ClientRegion.from_reply(_region_reply(frozen_memfd(PAGE), PAGE))
    [guarded] = frozen.areas  # mapped, reached through guarded copies only: no view
    assert guarded.view is None
    assert "can shrink" in caplog.text
    frozen.close()

    fd = sealable_memfd(PAGE)
    mine = os.dup(fd)
    sealed = ClientRegion.from_reply(_region_reply(fd, PAGE))  # the client adds F_SEAL_SHRINK
    assert sealed.mapped_area(0, PAGE) is not None
    assert fcntl.fcntl(mine, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(mine, 0)
    sealed.close()
    os.close(mine)


def test_client_does_not_map_a_region_fd_that_is_not_memory() -> None:
    zero = ClientRegion.from_reply(_region_reply(os.open("/dev/zero", os.O_RDWR), PAGE))
    assert zero.areas == ()
    with create_memfd("short", PAGE, seal=True) as memfd:
        short = ClientRegion.from_reply(_region_reply(os.dup(memfd.fileno()), 4 * PAGE))
    assert short.areas == ()


async def test_our_guest_memory_gets_zero_copy_views_on_the_server() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        with GuestMemory(4 * PAGE) as memory:
            await client.dma_map(memory, SRC)
            (mapping,) = device.dma
            assert mapping.mapped and not mapping.can_shrink
            with device.dma.view(SRC, 8, writable=True) as view:
                view[:] = b"zerocopy"
            assert memory.read(0, 8) == b"zerocopy"
            await client.dma_unmap_all()
