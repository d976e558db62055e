"""The null example: identity, one BAR of zeros that swallows writes, no interrupts of its own."""

from __future__ import annotations

import inspect
import os

from vfiouser_trio.examples import EXAMPLES, null
from vfiouser_trio.examples.null import NullDevice
from vfiouser_trio.protocol.constants import PCI_NUM_IRQS


async def test_bar0_reads_zeros_and_ignores_writes() -> None:
    before = len(os.listdir("/proc/self/fd"))
    dev = NullDevice()
    bar0 = dev.region(0)
    assert bar0 is not None and bar0.size == 0x100 and bar0.memory is None
    await bar0.do_write(0, b"\xff" * 0x100)
    assert await bar0.do_read(0, 0x100) == bytes(0x100)
    assert await bar0.do_read(0x7C, 4) == bytes(4)
    assert [i for i in range(7) if dev.region(i) is not None] == [0]
    dev.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_identity_bar_sizing_and_no_interrupts() -> None:
    dev = NullDevice()
    config = dev.config
    assert config.read(0, 4) == bytes.fromhex("34120071")  # 0x1234:0x7100
    assert config.read(0x09, 3) == bytes.fromhex("0000ff")  # class ff: unassigned
    config.write(0x10, b"\xff\xff\xff\xff")
    assert config.read(0x10, 4) == (0xFFFFFF00).to_bytes(4, "little")  # 32-bit memory, 256 bytes
    assert config.read(0x3D, 1) == b"\x00"  # no interrupt pin
    assert config.capabilities == ()
    # No interrupt of its own; ERR and REQ are every device's (QEMU's error recovery).
    counts = [dev.irqs.info(i).count for i in range(PCI_NUM_IRQS)]
    assert counts == [0, 0, 0, 1, 1]  # INTx, MSI, MSI-X, ERR, REQ
    dev.close()


def test_it_stays_the_smallest_example() -> None:
    assert len(inspect.getsource(null).splitlines()) < 30
    assert EXAMPLES["null"] is NullDevice
