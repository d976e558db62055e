"""The vendorcap example: config registers and a vendor capability served by callbacks, seen
by a client over a real socket, decoded by real pciutils, and its interrupt state hook."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from vfiouser_trio.examples import EXAMPLES
from vfiouser_trio.examples.vendorcap import (
    CONTROL_DOORBELL,
    CONTROL_LOUD,
    FEATURES,
    REGISTERS,
    REVISION,
    VendorCapDevice,
)
from vfiouser_trio.lspci_format import format_lspci_hex
from vfiouser_trio.protocol import PciRegion
from vfiouser_trio.protocol.constants import IRQ_SET_ACTION_MASK, IRQ_SET_DATA_NONE, PciIrq
from vfiouser_trio.server.pci_caps import CAP_ID_MSIX, CAP_ID_VENDOR
from vfiouser_trio.testing import nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

CONFIG = PciRegion.CONFIG
MSIX_CONTROL_ENABLE = 0x8000


def test_it_is_registered() -> None:
    assert EXAMPLES["vendorcap"] is VendorCapDevice


async def test_registers_and_vendor_capability_as_a_client_sees_them() -> None:
    device = VendorCapDevice()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            client = pair.client
            caps = {cap.id: cap.offset for cap in await client.config.capabilities()}
            assert set(caps) == {CAP_ID_MSIX, CAP_ID_VENDOR}
            vendor = caps[CAP_ID_VENDOR]
            assert await client.config.read(vendor + 2, 1) == 12  # length
            assert await client.config.read(vendor + 3, 1) == REVISION
            assert await client.config.read(vendor + 4, 4) == FEATURES
            await client.config.write(vendor + 4, 0xFFFFFFFF)  # read-only: ignored
            assert await client.config.read(vendor + 4, 4) == FEATURES
            await client.config.write(vendor + 8, CONTROL_LOUD)
            assert await client.config.read(vendor + 8, 4) == CONTROL_LOUD
            await client.config.write(REGISTERS, 0xCAFE)
            await client.config.write(REGISTERS + 4, 7)  # SCRATCH_WRITES is read-only
            assert await client.config.read(REGISTERS, 4) == 0xCAFE
            assert await client.config.read(REGISTERS + 4, 4) == 1
            assert await client.config.read(0x90, 4) == 0  # nothing declared there


async def test_the_doorbell_in_the_capability_raises_msix_and_the_hook_sees_masking() -> None:
    device = VendorCapDevice()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            client = pair.client
            msix = await client.config.find_capability(CAP_ID_MSIX)
            vendor = await client.config.find_capability(CAP_ID_VENDOR)
            assert msix is not None and vendor is not None
            [interrupt] = await client.enable_irqs(PciIrq.MSIX)
            await client.config.write(msix + 2, MSIX_CONTROL_ENABLE, size=2)
            await client.write(PciRegion.BAR0, 12, (0).to_bytes(4, "little"))  # unmask entry 0
            assert device.masks == {(PciIrq.MSIX, 0): False}
            await client.config.write(vendor + 8, CONTROL_DOORBELL)
            with trio.fail_after(5):
                assert await interrupt.eventfd.wait() == 1
            assert await client.config.read(vendor + 8, 4) == 0  # the doorbell reads 0
            await client.set_irqs(PciIrq.MSIX, 0, 1, IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE)
            assert device.masks == {(PciIrq.MSIX, 0): True}


LSPCI = shutil.which("lspci")


@pytest.mark.skipif(LSPCI is None, reason="pciutils' lspci is not on PATH")
async def test_real_lspci_shows_the_vendor_capability_in_the_chain(tmp_path: Path) -> None:
    device = VendorCapDevice()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            dump = await pair.client.config.dump()
    text_file = tmp_path / "dump.txt"
    text_file.write_text(format_lspci_hex(dump, bdf="00:05.0"))
    assert LSPCI is not None
    decoded = subprocess.run(
        [LSPCI, "-vvv", "-nn", "-F", str(text_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "[1234:7102]" in decoded
    assert "Capabilities: [40] MSI-X: Enable- Count=1" in decoded
    assert "Capabilities: [4c] Vendor Specific Information: Len=0c" in decoded
