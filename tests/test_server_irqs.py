"""IrqIndex / IrqTable: eventfd delivery, masking with pending delivery, SET_IRQS rules."""

from __future__ import annotations

import errno
import logging
import os
import socket
from functools import partial

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from vfiouser_trio.client import connect
from vfiouser_trio.eventfd import EVENTFD_MAX, EventFd
from vfiouser_trio.limits import ServerLimits
from vfiouser_trio.protocol import PciRegion
from vfiouser_trio.protocol.constants import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    PciIrq,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server import irqs as irqs_module
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.device_errors import DeviceCodeError
from vfiouser_trio.server.irqs import IrqIndex, IrqTable
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.pci_caps import MsiCapability, MsixCapability
from vfiouser_trio.server.serve import serve_connection
from vfiouser_trio.testing import nested_device

EVENTFD_TRIGGER = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER


def new_eventfds(n: int) -> tuple[list[int], list[int]]:
    """n eventfds: (the copies handed to the server, the ones the 'client' keeps)."""
    mine = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
    return [os.dup(fd) for fd in mine], mine


def count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_trigger_reaches_the_assigned_eventfd() -> None:
    before = fd_count()
    irq = IrqIndex(PciIrq.MSIX, 4)
    given, mine = new_eventfds(2)
    irq.set_irqs(EVENTFD_TRIGGER, 1, 2, b"", given)
    assert irq.trigger(0) is False  # no eventfd for vector 0
    assert irq.trigger(2) is True
    assert [count(fd) for fd in mine] == [0, 1]
    irq.set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, b"", [])  # disable all
    assert irq.trigger(2) is False
    for fd in mine:
        os.close(fd)
    assert fd_count() == before


def test_masked_vector_holds_pending_until_unmask() -> None:
    irq = IrqIndex(PciIrq.MSI, 2)
    given, mine = new_eventfds(2)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 2, b"", given)
    irq.set_irqs(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK, 0, 2, b"\x00\x01", [])
    assert not irq.is_masked(0) and irq.is_masked(1)
    assert irq.trigger(1) is False
    assert irq.is_pending(1) and count(mine[1]) == 0
    irq.set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 1, 1, b"", [])
    assert not irq.is_pending(1) and count(mine[1]) == 1
    irq.disable()
    for fd in mine:
        os.close(fd)


def test_gate_holds_interrupts_and_release_all_delivers() -> None:
    irq = IrqIndex(PciIrq.MSIX, 3)
    given, mine = new_eventfds(3)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 3, b"", given)
    open_ = False
    irq.set_gate(lambda v: open_)
    irq.trigger(0)
    irq.trigger(2)
    assert [count(fd) for fd in mine] == [0, 0, 0]
    open_ = True
    assert irq.release_all() == 2
    assert [count(fd) for fd in mine] == [1, 0, 1]
    irq.disable()
    for fd in mine:
        os.close(fd)


def test_intx_automasks_after_delivery() -> None:
    irq = IrqIndex(PciIrq.INTX, 1)
    given, mine = new_eventfds(1)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 1, b"", given)
    assert irq.trigger() is True
    assert irq.is_masked(0)
    assert irq.trigger() is False  # held until the client unmasks
    irq.set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1, b"", [])
    assert count(mine[0]) == 2
    irq.disable()
    os.close(mine[0])


def test_client_side_trigger_with_bool_data() -> None:
    irq = IrqIndex(PciIrq.MSIX, 3)
    given, mine = new_eventfds(3)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 3, b"", given)
    irq.set_irqs(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 3, b"\x01\x00\x01", [])
    assert [count(fd) for fd in mine] == [1, 0, 1]
    irq.disable()
    for fd in mine:
        os.close(fd)


def test_deassign_with_no_fds() -> None:
    before = fd_count()
    irq = IrqIndex(PciIrq.MSIX, 2)
    given, mine = new_eventfds(2)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 2, b"", given)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 1, b"", [])
    assert not irq.has_eventfd(0) and irq.has_eventfd(1)
    irq.disable()
    for fd in mine:
        os.close(fd)
    assert fd_count() == before


@pytest.mark.parametrize(
    ("index", "flags", "start", "count", "data", "nfds"),
    [
        (PciIrq.MSIX, EVENTFD_TRIGGER, 3, 2, b"", 2),  # beyond count
        (PciIrq.MSIX, EVENTFD_TRIGGER, 4, 1, b"", 1),  # start == count
        (PciIrq.MSIX, EVENTFD_TRIGGER, 2**32 - 1, 2, b"", 2),  # would wrap in C
        (PciIrq.MSIX, EVENTFD_TRIGGER, 0, 2, b"", 1),  # fds != count
        (PciIrq.MSIX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 1, b"", 1),  # fds, no EVENTFD
        (PciIrq.MSIX, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK, 0, 2, b"\x01", 0),  # bool bytes
        (PciIrq.MSIX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 0, 0, b"", 0),  # count 0 + MASK
        (PciIrq.MSIX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 1, 0, b"", 0),  # count 0, start 1
        (PciIrq.ERR, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 0, 1, b"", 0),  # ERR: not TRIGGER
        (PciIrq.REQ, EVENTFD_TRIGGER, 0, 2, b"", 2),  # REQ: count > 1
    ],
)
def test_set_irqs_semantic_errors_are_einval_and_close_fds(
    index: int, flags: int, start: int, count: int, data: bytes, nfds: int
) -> None:
    irq = IrqIndex(index, 4 if index == PciIrq.MSIX else 1)
    before = fd_count()
    given, mine = new_eventfds(nfds)
    with pytest.raises(VfioUserError) as exc:
        irq.set_irqs(flags, start, count, data, given)
    assert exc.value.errno == errno.EINVAL
    for fd in mine:
        os.close(fd)
    assert fd_count() == before


async def test_unmask_eventfd_unmasks_when_signalled() -> None:
    irq = IrqIndex(PciIrq.INTX, 1)
    given, mine = new_eventfds(1)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 1, b"", given)
    async with trio.open_nursery() as nursery:
        irq.attach(nursery)
        unmask_given, unmask_mine = new_eventfds(1)
        irq.set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, 0, 1, b"", unmask_given)
        irq.trigger()
        assert irq.is_masked(0) and count(mine[0]) == 1
        irq.trigger()  # held pending: INTx automasked
        os.eventfd_write(unmask_mine[0], 1)
        with trio.fail_after(5):
            while irq.is_pending(0):
                await trio.testing.wait_all_tasks_blocked()
        # The held interrupt was delivered on unmask, and INTx masked itself again.
        assert count(mine[0]) == 1
        assert irq.is_masked(0)
        irq.disable()
    for fd in mine + unmask_mine:
        os.close(fd)


def test_table_reports_unused_indexes_with_count_zero() -> None:
    table = IrqTable([IrqIndex(PciIrq.INTX, 1), IrqIndex(PciIrq.MSIX, 8)])
    assert table.num_irqs == 3
    assert table.info(PciIrq.MSI).count == 0
    assert table.info(PciIrq.MSIX).count == 8
    with pytest.raises(VfioUserError) as exc:
        table.info(3)
    assert exc.value.errno == errno.EINVAL


def test_count_zero_with_fds_is_refused_and_closes_them() -> None:
    irq = IrqIndex(PciIrq.MSIX, 2)
    before = fd_count()
    given, mine = new_eventfds(1)
    with pytest.raises(VfioUserError) as exc:
        irq.set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, b"", given)
    assert exc.value.errno == errno.EINVAL
    os.close(mine[0])
    assert fd_count() == before


def test_an_eventfd_that_cannot_be_signalled_counts_as_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="vfiouser_trio.server.irqs")
    irq = IrqIndex(PciIrq.MSIX, 2, owner="probe")
    given, mine = new_eventfds(2)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 2, b"", given)
    os.eventfd_write(mine[1], EVENTFD_MAX)
    assert irq.trigger(1) is False and irq.trigger(1) is False
    assert (irq.lost(0), irq.lost(1), irq.delivered) == (0, 2, 0)
    assert irq.trigger(0) is True and irq.delivered == 1
    assert count(mine[1]) == EVENTFD_MAX
    assert irq.trigger(1) is True  # room again
    assert irq.lost(1) == 2
    assert len(caplog.records) == 1 and "probe: IRQ index 2 vector 1" in caplog.text
    # A new eventfd on that vector (a new client, say) is warned about on its own.
    again, mine2 = new_eventfds(1)
    irq.set_irqs(EVENTFD_TRIGGER, 1, 1, b"", again)
    os.eventfd_write(mine2[0], EVENTFD_MAX)
    assert irq.trigger(1) is False and irq.lost(1) == 3
    assert len(caplog.records) == 2
    irq.disable()
    for fd in mine + mine2:
        os.close(fd)


def test_intx_masks_itself_when_its_trigger_is_coalesced() -> None:
    irq = IrqIndex(PciIrq.INTX, 1)
    given, mine = new_eventfds(1)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 1, b"", given)
    os.eventfd_write(mine[0], EVENTFD_MAX)
    assert irq.trigger() is False and irq.lost(0) == 1
    assert irq.is_masked(0)  # the client's counter holds the interrupt: wait for its unmask
    assert irq.trigger() is False and irq.is_pending(0) and irq.lost(0) == 1
    assert count(mine[0]) == EVENTFD_MAX
    irq.set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1, b"", [])
    assert count(mine[0]) == 1  # the held one, delivered on unmask
    irq.disable()
    os.close(mine[0])


def test_an_eventfd_filled_during_our_write_is_not_written_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """That race costs the loop a watchdog period each time: once is enough."""
    irq = IrqIndex(PciIrq.MSIX, 1)
    given, mine = new_eventfds(1)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 1, b"", given)
    calls: list[int] = []

    def interrupted(fd: int, n: int = 1) -> int:
        calls.append(fd)
        return errno.EINTR  # what the watchdog makes of a write the client made sleep

    monkeypatch.setattr(irqs_module, "signal_eventfd", interrupted)
    assert irq.trigger(0) is False and irq.trigger(0) is False
    assert len(calls) == 1 and irq.lost(0) == 2
    monkeypatch.undo()
    again, mine2 = new_eventfds(1)
    irq.set_irqs(EVENTFD_TRIGGER, 0, 1, b"", again)  # a new eventfd is signalled again
    assert irq.trigger(0) is True and count(mine2[0]) == 1
    irq.disable()
    for fd in mine + mine2:
        os.close(fd)


# --- the device's interrupt state hook (irq_state_changed), over a real socket ---------------

MASK_NONE = IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE
UNMASK_NONE = IRQ_SET_ACTION_UNMASK | IRQ_SET_DATA_NONE


class Watched(Device):
    """MSI (4 vectors, per-vector masking) and MSI-X (4 vectors in BAR1); records the hook."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7130), name="watched0")
        self.add_msi(4, per_vector_masking=True)
        self.add_bar(1, 0x1000)
        self.add_msix(4, bar=1)
        self.changes: list[tuple[int, int, int, bool]] = []

    def irq_state_changed(self, index: int, start: int, count: int, masked: bool) -> None:
        self.changes.append((index, start, count, masked))


class AsyncWatched(Watched):
    """The hook is an ``async def`` that yields before recording: order must still hold."""

    async def irq_state_changed(  # type: ignore[override]
        self, index: int, start: int, count: int, masked: bool
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.changes.append((index, start, count, masked))


class RaisingWatched(Watched):
    def irq_state_changed(self, index: int, start: int, count: int, masked: bool) -> None:
        raise RuntimeError("hook bug")


@pytest.mark.usefixtures("no_fd_leak")
async def test_the_hook_hears_set_irqs_mask_and_unmask_as_sent() -> None:
    device = Watched()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            client = pair.client
            await client.set_irqs(PciIrq.MSIX, 1, 3, MASK_NONE)
            await client.set_irqs(
                PciIrq.MSIX,
                0,
                4,
                IRQ_SET_ACTION_UNMASK | IRQ_SET_DATA_BOOL,
                data=[True, False, True, False],
            )
            await client.set_irqs(PciIrq.MSI, 0, 1, UNMASK_NONE)
            await client.set_irqs(PciIrq.MSIX, 0, 1, IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE)
    assert device.changes == [
        (PciIrq.MSIX, 1, 3, True),
        (PciIrq.MSIX, 0, 1, False),
        (PciIrq.MSIX, 2, 1, False),
        (PciIrq.MSI, 0, 1, False),
    ]  # a TRIGGER is no mask change
    assert device.irqs[PciIrq.MSIX].is_masked(1) and not device.irqs[PciIrq.MSIX].is_masked(2)


@pytest.mark.usefixtures("no_fd_leak")
async def test_the_hook_hears_each_signal_of_a_mask_eventfd() -> None:
    device = Watched()
    mask, unmask = EventFd(), EventFd()
    try:
        with trio.fail_after(10):
            async with nested_device(device) as pair:
                client = pair.client
                await client.set_irqs(
                    PciIrq.MSIX, 3, 1, IRQ_SET_ACTION_MASK | IRQ_SET_DATA_EVENTFD, eventfds=[mask]
                )
                await client.set_irqs(
                    PciIrq.MSIX,
                    3,
                    1,
                    IRQ_SET_ACTION_UNMASK | IRQ_SET_DATA_EVENTFD,
                    eventfds=[unmask],
                )
                mask.signal()
                await trio.testing.wait_all_tasks_blocked()
                unmask.signal()
                await trio.testing.wait_all_tasks_blocked()
    finally:
        mask.close()
        unmask.close()
    assert device.changes == [(PciIrq.MSIX, 3, 1, True), (PciIrq.MSIX, 3, 1, False)]


@pytest.mark.usefixtures("no_fd_leak")
async def test_the_hook_hears_msix_table_bits_and_the_function_mask_and_msi_mask_bits() -> None:
    device = Watched()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            client, config = pair.client, device.config
            msix = config.find_capability(MsixCapability)
            msi = config.find_capability(MsiCapability)
            assert msix is not None and msi is not None
            # Table entry 2's vector control: unmask, rewrite unmasked (no change), mask.
            await client.write(PciRegion.BAR1, 2 * 16 + 12, (0).to_bytes(4, "little"))
            await client.write(PciRegion.BAR1, 2 * 16 + 12, (0).to_bytes(4, "little"))
            await client.write(PciRegion.BAR1, 2 * 16, bytes(12))  # address/data: no change
            await client.write(PciRegion.BAR1, 2 * 16 + 12, (1).to_bytes(4, "little"))
            # Function mask on, then off (enable stays set).
            control = msix.offset + MsixCapability.CONTROL
            await client.write(PciRegion.CONFIG, control, (0xC000).to_bytes(2, "little"))
            await client.write(PciRegion.CONFIG, control, (0x8000).to_bytes(2, "little"))
            # MSI mask bits: vectors 0 and 3 masked, then 0 unmasked.
            mask_register = msi.offset + MsiCapability(4, per_vector_masking=True).mask_offset
            await client.write(PciRegion.CONFIG, mask_register, (0b1001).to_bytes(4, "little"))
            await client.write(PciRegion.CONFIG, mask_register, (0b1000).to_bytes(4, "little"))
    assert device.changes == [
        (PciIrq.MSIX, 2, 1, False),
        (PciIrq.MSIX, 2, 1, True),
        (PciIrq.MSIX, 0, 4, True),
        (PciIrq.MSIX, 0, 4, False),
        (PciIrq.MSI, 0, 1, True),
        (PciIrq.MSI, 3, 1, True),
        (PciIrq.MSI, 0, 1, False),
    ]


@pytest.mark.usefixtures("no_fd_leak")
async def test_an_async_hook_runs_its_calls_in_order() -> None:
    device = AsyncWatched()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            for vector in range(4):
                await pair.client.set_irqs(PciIrq.MSIX, vector, 1, MASK_NONE)
            await pair.client.set_irqs(PciIrq.MSIX, 0, 4, UNMASK_NONE)
            await trio.testing.wait_all_tasks_blocked()
    assert device.changes == [(PciIrq.MSIX, v, 1, True) for v in range(4)] + [
        (PciIrq.MSIX, 0, 4, False)
    ]


@pytest.mark.usefixtures("no_fd_leak")
async def test_a_raising_hook_is_a_device_error_and_the_mask_still_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = RaisingWatched()
    with trio.fail_after(10), pytest.raises(DeviceCodeError) as raised:
        async with nested_device(device) as pair:
            await pair.client.set_irqs(PciIrq.MSIX, 1, 1, MASK_NONE)  # answered: no error
            assert device.irqs[PciIrq.MSIX].is_masked(1)
    assert raised.value.command == "SET_IRQS"
    assert "irq_state_changed(index=2, start=1, count=1, masked=True) raised" in raised.value.reason
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert "watched0: SET_IRQS in the interrupt state hook" in caplog.text


def test_a_device_without_the_hook_installs_nothing() -> None:
    class Plain(Device):
        def __init__(self) -> None:
            super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7131))
            self.add_msi(2, per_vector_masking=True)

    device = Plain()
    assert all(irq.state_notify is None for irq in device.irqs)


class SlowWatched(Watched):
    """An async hook held until ``go`` is set: the client's masking runs ahead of it."""

    def __init__(self) -> None:
        super().__init__()
        self.go = trio.Event()

    async def irq_state_changed(  # type: ignore[override]
        self, index: int, start: int, count: int, masked: bool
    ) -> None:
        await self.go.wait()
        self.changes.append((index, start, count, masked))


@pytest.mark.usefixtures("no_fd_leak")
async def test_an_async_hook_far_behind_drops_calls_beyond_the_backlog(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = SlowWatched()
    limits = ServerLimits(max_irq_state_backlog=2)
    ours, theirs = socket.socketpair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_connection, device, ours, limits=limits))
            async with connect(theirs) as client:
                for vector in range(4):
                    await client.set_irqs(PciIrq.MSIX, vector, 1, MASK_NONE)
                await client.set_irqs(PciIrq.MSIX, 0, 4, UNMASK_NONE)  # all answered
                await trio.testing.wait_all_tasks_blocked()
                device.go.set()
                await trio.testing.wait_all_tasks_blocked()
    # One call running, two waiting; the other two were dropped, and said so.
    assert device.changes == [(PciIrq.MSIX, v, 1, True) for v in range(3)]
    assert device.irqs.state_calls_dropped == 2
    assert "watched0: the interrupt state hook is 2 calls behind" in caplog.text
    assert all(device.irqs[PciIrq.MSIX].is_masked(v) is False for v in range(4))  # applied
    device.close()


@pytest.mark.usefixtures("no_fd_leak")
async def test_a_reset_is_not_reported_as_the_clients_masking() -> None:
    device = Watched()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            msi = device.config.find_capability(MsiCapability)
            assert msi is not None
            mask_register = msi.offset + MsiCapability(4, per_vector_masking=True).mask_offset
            await pair.client.write(PciRegion.CONFIG, mask_register, (0b10).to_bytes(4, "little"))
            await pair.client.reset()  # the mask bits go back to power-on (0)
    assert device.changes == [(PciIrq.MSI, 1, 1, True)]
