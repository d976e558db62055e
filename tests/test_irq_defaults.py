"""Every device's ERR and REQ vectors, and the two INTx masking semantics (issue 10, 4 and 9).

QEMU enables error recovery only when ERR has exactly one vector (it warns otherwise at
every start) and gives ERR and REQ one eventfd each; INTx is either kernel-like (automasked
until the client unmasks, as QEMU does after each EOI) or edge-like for clients that never
unmask, and a client that enables INTx finds it unmasked, also after a migration.
"""

from __future__ import annotations

import errno
from contextlib import AbstractAsyncContextManager

import pytest
import trio

from vfiouser_trio.client import Client, Interrupt, migrate
from vfiouser_trio.examples import EXAMPLES
from vfiouser_trio.protocol.constants import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_NONE,
    PciIrq,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.testing import NestedDevice, nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

INTX, ERR, REQ = PciIrq.INTX, PciIrq.ERR, PciIrq.REQ


class Pin(Device):
    """A device with one INTx pin, declared with the semantics under test, that migrates."""

    def __init__(self, *, automask: bool = True, error_irqs: bool = True) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x11F0))
        self.add_bar(0, 0x1000, memory=True)
        self.add_intx(automask=automask)
        if not error_irqs:
            self.add_irq(ERR, 0)
            self.add_irq(REQ, 0)
        self.enable_migration()

    async def save_state(self) -> bytes:
        return b""

    async def load_state(self, data: bytes) -> None:
        pass


def pair_of(device: Device) -> AbstractAsyncContextManager[NestedDevice[Device]]:
    return nested_device(device, check_fds=False)


async def wait_count(irq: Interrupt) -> int:
    with trio.fail_after(5):
        return await irq.wait()


# --- item 4: ERR and REQ ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLES))
async def test_every_example_reports_err_and_req_with_one_eventfd_vector(name: str) -> None:
    async with nested_device(EXAMPLES[name]()) as pair:
        for index in (ERR, REQ):
            info = pair.client.irq_info[index]
            assert (info.count, info.flags) == (1, IRQ_INFO_EVENTFD)
    pair.device.close()


async def test_err_and_req_take_a_trigger_eventfd_and_deliver_to_it() -> None:
    device = Pin()
    async with nested_device(device) as pair:
        client = pair.client
        err = (await client.enable_irqs(ERR))[0]
        req = (await client.enable_irqs(REQ))[0]
        assert device.trigger(0, index=REQ)  # "release the device" (QEMU's vfio-pci unplugs it)
        assert await wait_count(req) == 1
        assert device.trigger(0, index=ERR)
        assert await wait_count(err) == 1
        assert err.try_read() is None and req.try_read() is None
        # Only TRIGGER is defined for them, as in vfio-pci: MASK is EINVAL, nothing changes.
        with pytest.raises(VfioUserError) as info:
            await client.set_irqs(ERR, 0, 1, IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE)
        assert info.value.errno == errno.EINVAL
        assert device.trigger(0, index=ERR) and await wait_count(err) == 1
        # QEMU's exit de-assigns them (count 0): triggers then go nowhere.
        await client.set_irqs(REQ, 0, 0, IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE)
        assert not device.trigger(0, index=REQ)
    device.close()


async def test_a_device_may_opt_out_of_err_and_req() -> None:
    device = Pin(error_irqs=False)
    async with nested_device(device) as pair:
        assert pair.client.irq_info[ERR].count == 0
        assert pair.client.irq_info[REQ].count == 0
        with pytest.raises(VfioUserError) as info:
            await pair.client.enable_irqs(ERR, 1)
        assert info.value.errno == errno.EINVAL
    device.close()


# --- item 9: INTx masking, explicit ------------------------------------------------------


async def test_intx_flags_say_which_semantics_the_device_chose() -> None:
    for automask, flags in (
        (True, IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED),
        (False, IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE),
    ):
        device = Pin(automask=automask)
        async with nested_device(device) as pair:
            info = pair.client.irq_info[INTX]
            assert (info.count, info.flags) == (1, flags)
            assert info.automasked is automask
        device.close()


async def test_automasked_intx_waits_for_the_clients_unmask() -> None:
    device = Pin()
    async with nested_device(device) as pair:
        intx = (await pair.client.enable_irqs(INTX))[0]
        assert device.trigger(0, index=INTX) and await wait_count(intx) == 1
        assert not device.trigger(0, index=INTX)  # held: the client has not unmasked
        await pair.client.unmask_irqs(INTX)  # QEMU, after the guest's EOI
        assert await wait_count(intx) == 1
    device.close()


async def test_edge_intx_delivers_every_trigger_to_a_client_that_never_unmasks() -> None:
    device = Pin(automask=False)
    async with nested_device(device) as pair:
        intx = (await pair.client.enable_irqs(INTX))[0]
        for _ in range(3):
            assert device.trigger(0, index=INTX)
            assert await wait_count(intx) == 1
        # Still maskable by the client itself.
        await pair.client.mask_irqs(INTX)
        assert not device.trigger(0, index=INTX)
        await pair.client.unmask_irqs(INTX)
        assert await wait_count(intx) == 1
    device.close()


async def test_a_new_client_enabling_intx_finds_it_unmasked() -> None:
    # The first client (a QEMU that went away mid-interrupt) left INTx automasked; the next
    # one never took that interrupt, so it would never unmask it.
    device = Pin()
    async with nested_device(device) as pair:
        intx = (await pair.client.enable_irqs(INTX))[0]
        assert device.trigger(0, index=INTX) and await wait_count(intx) == 1
    assert device.irqs[INTX].is_masked(0)
    async with nested_device(device) as pair:
        intx = (await pair.client.enable_irqs(INTX))[0]
        assert not device.irqs[INTX].is_masked(0)
        assert device.trigger(0, index=INTX) and await wait_count(intx) == 1
    device.close()


async def test_intx_works_after_qemus_reset_sequence_mid_interrupt() -> None:
    # QEMU's reset: INTx disabled (count 0, and QEMU forgets its pending EOI), the device
    # reset, INTx enabled again with a new eventfd. It never unmasks what it no longer knows.
    device = Pin()
    async with nested_device(device) as pair:
        client = pair.client
        intx = (await client.enable_irqs(INTX))[0]
        assert device.trigger(0, index=INTX) and await wait_count(intx) == 1
        await client.disable_irqs(INTX)
        await client.reset()
        intx = (await client.enable_irqs(INTX))[0]
        assert device.trigger(0, index=INTX) and await wait_count(intx) == 1
    device.close()


async def enable_intx(source: Client, destination: Client) -> tuple[Interrupt, Interrupt]:
    """Both clients enable INTx before migrating, as QEMU's destination does at realize."""
    src = (await source.enable_irqs(INTX))[0]
    dst = (await destination.enable_irqs(INTX))[0]
    return src, dst


@pytest.mark.parametrize("automask", [True, False], ids=["automask", "edge"])
async def test_intx_across_a_migration_to_a_client_that_never_unmasks(automask: bool) -> None:
    source, target = Pin(automask=automask), Pin(automask=automask)
    # The module's no_fd_leak checks the whole test; each pair's own check would count
    # the other pair's fds and what the first eventfd use in a process creates lazily.
    async with pair_of(source) as src, pair_of(target) as dst:
        src_intx, dst_intx = await enable_intx(src.client, dst.client)
        assert source.trigger(0, index=INTX) and await wait_count(src_intx) == 1
        # A second one while the source client has not unmasked: held (automask) or delivered.
        assert source.trigger(0, index=INTX) is not automask
        if not automask:
            assert await wait_count(src_intx) == 1
        assert source.irqs[INTX].is_masked(0) is automask

        await migrate(src.client, dst.client)

        # The destination's client enabled INTx before the state arrived: the source's
        # automask does not bind it, and the held interrupt went out when the destination ran.
        if automask:
            assert await wait_count(dst_intx) == 1
            assert target.irqs[INTX].is_masked(0)  # that delivery masked it, for this client
            await dst.client.unmask_irqs(INTX)
        assert not target.irqs[INTX].is_masked(0)
        assert target.trigger(0, index=INTX) and await wait_count(dst_intx) == 1
        if not automask:
            assert target.trigger(0, index=INTX) and await wait_count(dst_intx) == 1
    source.close()
    target.close()


async def test_a_migrated_automask_applies_until_the_destination_client_enables_intx() -> None:
    # A destination client that enables INTx only after resuming (our own client's order).
    source, target = Pin(), Pin()
    # The module's no_fd_leak checks the whole test; each pair's own check would count
    # the other pair's fds and what the first eventfd use in a process creates lazily.
    async with pair_of(source) as src, pair_of(target) as dst:
        src_intx = (await src.client.enable_irqs(INTX))[0]
        assert source.trigger(0, index=INTX) and await wait_count(src_intx) == 1
        await migrate(src.client, dst.client)
        assert target.irqs[INTX].is_masked(0)  # the source's bit, nobody to unmask it yet
        dst_intx = (await dst.client.enable_irqs(INTX))[0]
        assert not target.irqs[INTX].is_masked(0)
        assert target.trigger(0, index=INTX) and await wait_count(dst_intx) == 1
    source.close()
    target.close()
