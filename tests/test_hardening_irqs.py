"""Hostile clients and eventfds: SET_IRQS fds are checked, interrupts and doorbells never block.

A client shares each eventfd's open file description with the server, so it can send
something that is not an eventfd, clear O_NONBLOCK, or fill the counter at will. None of
that may block the server's trio loop or raise into device code.

A blocking write or read would block the whole thread, so a trio loop cannot time itself
out of it: scenarios that could hang run ``trio.run`` in a worker thread, joined with a
timeout, and on a hang the test unsticks the thread (it holds the client's end of the
eventfd) and fails.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from tests.raw_client import expect_errno, raw_payload, session
from vfiouser_trio.eventfd import EVENTFD_MAX
from vfiouser_trio.protocol import (
    RegionIoFdsRequest,
    RegionReadRequest,
    SetIrqsRequest,
)
from vfiouser_trio.protocol.constants import (
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    PciIrq,
    PciRegion,
)
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.testing import nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

TRIGGER = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
DOORBELL = 0x40
#: How long a scenario may take before we call it hung (it takes milliseconds).
HANG = 20.0


class Bells(Device):
    """BAR0 of plain registers with a doorbell at DOORBELL; MSI-X and INTx interrupts.

    With ``listen`` its ``run()`` loop waits on the doorbell and records each wake-up.
    """

    def __init__(self, name: str, *, listen: bool = False) -> None:
        super().__init__(
            PciIdentity(vendor_id=0x1AF4, device_id=0x10FF, class_code=0xFF0000), name=name
        )
        self.regs = bytearray(0x100)
        self.add_bar(0, 0x100, read=self.read0, write=self.write0)
        self.add_bar(2, 0x1000)
        self.add_msix(2, bar=2)
        self.bell = self.add_doorbell(0, DOORBELL)
        self.listen = listen
        self.rings: list[int] = []
        self.rang = trio.Event()
        self.region(0)  # built now: its doorbell's fd predates the pairs' leak checks

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(self.regs[offset : offset + size])

    async def write0(self, offset: int, data: bytes) -> None:
        self.regs[offset : offset + len(data)] = data

    async def run(self) -> None:
        while self.listen:
            self.rings.append(await self.bell.wait())
            self.rang.set()

    async def next_ring(self) -> int:
        with trio.fail_after(HANG):
            await self.rang.wait()
        self.rang = trio.Event()
        return self.rings[-1]


def run_in_thread(scenario: Callable[[], Awaitable[None]], unstick: Callable[[], object]) -> None:
    """``trio.run(scenario)`` in a thread; fail (after ``unstick()``) if it hangs."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            trio.run(scenario)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="scenario", daemon=True)
    thread.start()
    thread.join(HANG)
    if thread.is_alive():
        unstick()
        thread.join(HANG)
        pytest.fail("the server's trio loop blocked on the client's eventfd")
    if errors:
        raise errors[0]


# --- SET_IRQS: every fd must be an eventfd -------------------------------------------------


def _directory() -> int:
    return os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _pipe_read_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _socket_peer_closed() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _memfd() -> int:
    return os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)


NOT_EVENTFDS = {
    "directory": _directory,
    "pipe read end": _pipe_read_end,
    "socket, peer closed": _socket_peer_closed,
    "memfd": _memfd,
}


def _eventfd(blocking: bool = False) -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | (0 if blocking else os.EFD_NONBLOCK))


def _count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.mark.parametrize("kind", sorted(NOT_EVENTFDS))
@pytest.mark.parametrize("action", [IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK])
async def test_set_irqs_refuses_an_fd_that_is_not_an_eventfd(kind: str, action: int) -> None:
    device = Bells("victim")
    async with session(device) as conn:
        index = PciIrq.MSIX
        # A good assignment first: the refused request must leave it as it is.
        kept = [_eventfd() for _ in range(2)]
        request = SetIrqsRequest(index, TRIGGER, 0, 2, fds=tuple(kept))
        assert await raw_payload(conn, request) == b""
        before = fd_count()
        good, bad = _eventfd(), NOT_EVENTFDS[kind]()
        flags = IRQ_SET_DATA_EVENTFD | action
        await expect_errno(conn, SetIrqsRequest(index, flags, 0, 2, fds=(good, bad)), errno.EINVAL)
        os.close(good)
        os.close(bad)
        assert fd_count() == before  # the server kept none of the refused fds
        # Nothing changed: the earlier eventfds still take the interrupts.
        assert device.trigger(0, index=index)
        assert _count(kept[0]) == 1
        assert device.irqs[index].lost(0) == 0
        # And the server still answers.
        assert len(await raw_payload(conn, RegionReadRequest(PciRegion.BAR0, 0, 4))) == 16 + 4
        for fd in kept:
            os.close(fd)
    device.close()


# --- interrupts: a full counter on a blocking eventfd --------------------------------------


@pytest.mark.parametrize("how", ["sent blocking", "O_NONBLOCK cleared later"])
def test_trigger_on_a_full_blocking_eventfd_returns_at_once(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vfiouser_trio.server.irqs")
    mine = _eventfd(blocking=how == "sent blocking")
    device = Bells("victim")
    other = Bells("bystander")
    results: list[bool] = []

    async def scenario() -> None:
        async with session(device) as conn, session(other) as other_conn:
            request = SetIrqsRequest(PciIrq.MSIX, TRIGGER, 0, 1, fds=(mine,))
            assert await raw_payload(conn, request) == b""
            os.set_blocking(mine, False)
            os.eventfd_write(mine, EVENTFD_MAX)  # full: a write of 1 more would sleep
            os.set_blocking(mine, True)
            results.append(device.trigger(0, index=PciIrq.MSIX))
            results.append(device.trigger(0, index=PciIrq.MSIX))
            # The process goes on: the other device answers.
            reply = await raw_payload(other_conn, RegionReadRequest(PciRegion.BAR0, 0, 4))
            assert len(reply) == 16 + 4

    try:
        run_in_thread(scenario, unstick=lambda: os.eventfd_read(mine))
        assert results == [False, False]  # coalesced: the client has one pending already
        assert device.irqs[PciIrq.MSIX].lost(0) == 2
        assert os.eventfd_read(mine) == EVENTFD_MAX
        warnings = [r for r in caplog.records if r.name == "vfiouser_trio.server.irqs"]
        assert len(warnings) == 1  # once per vector and cause, not per interrupt
        assert "victim" in warnings[0].getMessage()
        assert "vector 0" in warnings[0].getMessage()
    finally:
        os.close(mine)
        device.close()
        other.close()


# --- doorbells: the client shares the server's description ----------------------------------


@pytest.fixture
def two_devices() -> Iterator[tuple[Bells, Bells]]:
    victim, bystander = Bells("victim", listen=True), Bells("bystander", listen=True)
    yield victim, bystander
    victim.close()
    bystander.close()


def test_client_clears_o_nonblock_on_a_doorbell_then_rings_and_drains(
    two_devices: tuple[Bells, Bells],
) -> None:
    victim, bystander = two_devices
    client_fd: list[int] = []

    def unstick() -> None:
        os.eventfd_write(client_fd[0], 1)

    async def scenario() -> None:
        async with nested_device(victim) as pair:
            (sub,) = await pair.client.region_io_fds(PciRegion.BAR0)
            fd = sub.eventfd.fileno()
            client_fd.append(fd)
            # The server reads with the device already waiting: wake it, then let it wait
            # again on a description that is now blocking.
            os.set_blocking(fd, True)
            sub.ring()
            assert await victim.next_ring() == 1
            await trio.testing.wait_all_tasks_blocked()
            # Ring and drain at once: the server may wake to an empty counter.
            sub.ring()
            assert sub.eventfd.try_read() == 1
            await trio.testing.wait_all_tasks_blocked()
            sub.ring()
            assert await victim.next_ring() == 1
            async with nested_device(bystander) as other:
                await other.client.write(PciRegion.BAR0, DOORBELL, b"\1\0\0\0")
                assert await bystander.next_ring() == 1
                assert await other.client.read(PciRegion.BAR0, 0, 4) == bytes(4)

    run_in_thread(scenario, unstick)


@pytest.mark.parametrize("blocking", [False, True], ids=["non-blocking", "blocking"])
def test_client_fills_a_doorbell_then_region_write_rings_it(blocking: bool) -> None:
    victim, bystander = Bells("victim"), Bells("bystander", listen=True)
    client_fd: list[int] = []

    def unstick() -> None:
        os.eventfd_read(client_fd[0])

    async def scenario() -> None:
        async with nested_device(bystander) as other, nested_device(victim) as pair:
            (sub,) = await pair.client.region_io_fds(PciRegion.BAR0)
            fd = sub.eventfd.fileno()
            client_fd.append(fd)
            assert sub.eventfd.signal(EVENTFD_MAX)
            os.set_blocking(fd, blocking)
            # The same doorbell, rung by a REGION_WRITE: already rung, so a no-op.
            await pair.client.write(PciRegion.BAR0, DOORBELL, b"\1\0\0\0")
            assert await pair.client.read(PciRegion.BAR0, DOORBELL, 4) == b"\1\0\0\0"
            with trio.fail_after(HANG):
                assert await victim.bell.wait() == EVENTFD_MAX
            # Another device of the process still answers.
            await other.client.write(PciRegion.BAR0, DOORBELL, b"\1\0\0\0")
            assert await bystander.next_ring() == 1
            assert await other.client.read(PciRegion.BAR0, 0, 4) == bytes(4)

    try:
        run_in_thread(scenario, unstick)
    finally:
        victim.close()
        bystander.close()


async def test_a_former_client_cannot_ring_the_next_clients_doorbell() -> None:
    device = Bells("shared", listen=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.run)
        async with session(device) as conn:
            reply = await conn.request(RegionIoFdsRequest(PciRegion.BAR0, argsz=16 + 40))
            (kept,) = reply.fds  # the first client keeps its copy after it leaves
        async with session(device) as conn:
            await trio.testing.wait_all_tasks_blocked()
            os.eventfd_write(kept, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert device.rings == []  # the old copy rings nothing
            reply = await conn.request(RegionIoFdsRequest(PciRegion.BAR0, argsz=16 + 40))
            (mine,) = reply.fds
            os.eventfd_write(mine, 1)
            assert await device.next_ring() == 1
            os.close(mine)
        nursery.cancel_scope.cancel()
    os.close(kept)
    device.close()
