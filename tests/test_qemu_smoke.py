"""QEMU's vfio-user-pci, a real client, against our hardened server.

Every fd QEMU sends passes the server's checks (guest RAM memfds for DMA_MAP, eventfds for
SET_IRQS), guest RAM without an fd is mapped for message DMA, the guest kernel enumerates
the device, and once QEMU exits the device is free for its next client at once with
nothing of QEMU's left. Skipped without a provisioned QEMU (see tests/qemu_guest.py).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio
from qemu_guest import GUEST_TIMEOUT, Qemu, build_initramfs, guest_report

from vfiouser_trio.client import connect
from vfiouser_trio.examples import DmaEngine, GpioDevice
from vfiouser_trio.protocol import Command
from vfiouser_trio.server import Device, DeviceServer, serve
from vfiouser_trio.testing import Tracer


@pytest.fixture
def qemu() -> Qemu:
    return Qemu.from_environment()


LIST_PCI = """for d in /sys/bus/pci/devices/*; do
  echo "pci $(cat $d/vendor) $(cat $d/device) $(cat $d/class)"
done
"""


@pytest.mark.parametrize(
    ("make_device", "shared_memory"),
    [(GpioDevice, True), (DmaEngine, False)],
    ids=["gpio-memfd-ram", "dmaengine-ram-without-fd"],
)
async def test_qemu_drives_the_device_and_leaves_it_free(
    qemu: Qemu, tmp_path: Path, make_device: type[Device], shared_memory: bool
) -> None:
    initrd = build_initramfs(tmp_path, LIST_PCI)
    device = make_device()
    tracer = Tracer()
    path = tmp_path / "device.sock"
    async with trio.open_nursery() as nursery:
        server: DeviceServer = await nursery.start(partial(serve, device, path, hooks=tracer))
        with trio.fail_after(GUEST_TIMEOUT):
            guest = await trio.run_process(
                qemu.command(path, initrd, shared_memory=shared_memory),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        console = guest.stdout.decode(errors="replace")
        assert guest.returncode == 0, guest.stderr.decode(errors="replace")
        identity = device.identity
        assert f"pci {identity.vendor_id:#06x} {identity.device_id:#06x}" in " ".join(
            guest_report(console)
        )
        # Nothing QEMU sent was refused.
        assert [(r.command, r.errno) for r in tracer.errors()] == []
        maps = tracer.commands(Command.DMA_MAP)
        assert maps, "QEMU mapped no guest memory"
        with_fds = [r for r in maps if r.fd_count]
        assert bool(with_fds) == shared_memory
        # QEMU has gone: the next client is served at once, and nothing of QEMU's is held.
        with trio.fail_after(30):
            async with connect(path) as client:
                header = await client.config.header()
                assert (header.vendor_id, header.device_id) == (
                    identity.vendor_id,
                    identity.device_id,
                )
                assert len(device.dma) == 0
        assert server.connections == 2
        nursery.cancel_scope.cancel()
    device.close()
