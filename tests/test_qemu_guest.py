"""QEMU's vfio-user-pci and a Linux 6.1 guest drive our example devices.

Two boots cover everything, each with several devices (a boot under TCG costs tens of
seconds, the checks inside it almost nothing):

- guest RAM shared by memfd: gpio (Linux's gpio-pci-idio-16 driver), null and dmaengine.
  Lines written and read in the guest match the device object; an input change is an
  interrupt the guest counts; the engine copies guest memory; a guest bus reset and QMP
  ``system_reset`` reach ``reset()``; ``device_del`` hands the device back; QEMU prints
  nothing on stderr (no warning for any example device).
- guest RAM without an fd: the engine copies through DMA_READ/DMA_WRITE messages, and a
  gpio server in another process is killed under the running guest: QEMU stays up and the
  guest's accesses fail at once (write_multiple is not offered; docs/qemu.md, item 5).

Skipped without a provisioned QEMU (see tests/qemu_guest.py and docs/qemu.md).
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.cli_process import CLI, env, wait_until_serving
from tests.qemu_guest import (
    DMA_SCRATCH,
    GuestDevice,
    Qemu,
    build_initramfs,
    guest_command,
    report_values,
    running_guest,
    shell_command,
)
from vfiouser_trio.client import connect
from vfiouser_trio.examples import DmaEngine, GpioDevice, NullDevice
from vfiouser_trio.protocol import Command, PciIrq, SetIrqsRequest
from vfiouser_trio.protocol.constants import IRQ_SET_ACTION_UNMASK
from vfiouser_trio.server import DEFAULT_SERVER_CAPABILITIES, Device, DeviceServer, serve
from vfiouser_trio.server.serve import serve_connection
from vfiouser_trio.testing import Tracer

pytestmark = pytest.mark.usefixtures("no_fd_leak")

#: Guest shell helpers every script starts with. ``host NAME`` prints ``@NAME`` and waits
#: for the test's answer on ttyS1 (fd 3).
PRELUDE = r"""
pci() { for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "$1" ] && echo $d; done; }
host() { echo "@$1"; read -r reply <&3; }
irqs() { awk -v n="$(cat $1/irq):" '$1 == n {print $2}' /proc/interrupts; }
uptime_cs() { tr -d . </proc/uptime | cut -d' ' -f1; }
GPIO=$(pci 0x494f:0x0dc8); NULL=$(pci 0x1234:0x7100); DMA=$(pci 0x1234:0x7101)
"""

#: Lines 0-15 of the gpio chip are the card's outputs, 16-31 its inputs (gpio-pci-idio-16).
GPIO_LINES = r"""
echo "gpio_driver=$(basename $(readlink $GPIO/driver))"
base=$(cat $GPIO/gpio/gpiochip*/base)
# The driver names its lines OUT0-OUT15 and IIN0-IIN15, and sysfs names them so.
line() { n=$((base + $1)); [ $1 -lt 16 ] && name=OUT$1 || name=IIN$(($1 - 16))
  [ -d /sys/class/gpio/$name ] || echo $n >/sys/class/gpio/export; echo /sys/class/gpio/$name; }
for i in 0 3 9 15; do echo high >$(line $i)/direction; done
host outputs
in=0; for i in $(seq 0 15); do [ $(cat $(line $((16 + i)))/value) = 1 ] && in=$((in | 1 << i)); done
echo "inputs=$in"
"""

#: Ask for an edge interrupt on input 4, let the test toggle it, count the PCI line's IRQs.
GPIO_INTERRUPT = r"""
echo both >$(line 20)/edge
before=$(irqs $GPIO)
host interrupt
i=0; while [ $(irqs $GPIO) = $before ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "irqs_before=$before"; echo "irqs_after=$(irqs $GPIO)"
"""

#: One 64 KiB copy by the engine, ring and buffers in the RAM `memmap=` set aside.
DMA_COPY = (
    f"SCRATCH={DMA_SCRATCH:#x}"
    + r"""
bar=$(( $(head -1 $DMA/resource | cut -d' ' -f1) ))
printf '\006' | dd of=$DMA/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
ring=$SCRATCH; src=$((SCRATCH + 0x10000)); dst=$((SCRATCH + 0x20000)); pages=16
dd if=/dev/urandom of=/tmp/src bs=4096 count=$pages 2>/dev/null
dd if=/tmp/src of=/dev/mem bs=4096 seek=$((src / 4096)) conv=notrunc 2>/dev/null
dd if=/dev/zero of=/dev/mem bs=4096 seek=$((dst / 4096)) count=$pages conv=notrunc 2>/dev/null
devmem $((ring + 0x18)) 64 0; devmem $ring 64 $src; devmem $((ring + 8)) 64 $dst
devmem $((ring + 0x10)) 64 $(( (1 << 32) | pages * 4096 ))
devmem $((bar + 0x10)) 32 $ring; devmem $((bar + 0x14)) 32 0; devmem $((bar + 0x18)) 32 4
devmem $((bar + 0x08)) 32 1; devmem $((bar + 0x20)) 32 1
i=0; while [ $(( $(devmem $((ring + 0x18)) 32) & 1 )) = 0 ] && [ $i -lt 300 ]; do
  sleep 0.1; i=$((i + 1)); done
echo "dma_status=$(devmem $((ring + 0x18)) 32)"
echo "dma_error_code=$(devmem $((bar + 0x2c)) 32)"
dd if=/dev/mem of=/tmp/dst bs=4096 skip=$((dst / 4096)) count=$pages 2>/dev/null
cmp -s /tmp/src /tmp/dst && echo dma_copy=identical || echo dma_copy=different
"""
)

SHARED_RAM_SCRIPT = (
    PRELUDE
    + GPIO_LINES
    + GPIO_INTERRUPT
    + DMA_COPY
    + r"""
host bus-reset
echo 1 >$GPIO/reset && echo bus_reset=done
host unplug
[ -e "$NULL" ] && echo null_present=yes || echo null_present=no
host system-reset
"""
)

UNSHARED_RAM_SCRIPT = (
    PRELUDE
    + r"""
echo "gpio_driver=$(basename $(readlink $GPIO/driver))"
base=$(cat $GPIO/gpio/gpiochip*/base)
echo $((base + 16)) >/sys/class/gpio/export
value=/sys/class/gpio/IIN0/value
echo "live_read=$(cat $value)"
host kill
t0=$(uptime_cs)
for i in 1 2 3; do cat $value >/dev/null 2>&1; done
echo "dead_reads_cs=$(( $(uptime_cs) - t0 ))"
host dead-reads
"""
    + DMA_COPY
)


class ResetCounter:
    """Counts a device's ``reset()`` calls; `wait_beyond` waits for the next one."""

    def __init__(self, device: Device) -> None:
        self.count = 0
        self._changed = trio.Event()
        original = device.reset

        async def reset() -> None:
            await original()
            self.count += 1
            self._changed.set()
            self._changed = trio.Event()

        device.reset = reset  # type: ignore[method-assign]

    async def wait_beyond(self, count: int) -> None:
        while self.count <= count:
            await self._changed.wait()


def shared_ram_devices(directory: Path) -> list[GuestDevice]:
    """The first boot's devices: gpio, null and dmaengine, served in the test."""
    return [GuestDevice(directory / f"{name}.sock", name) for name in ("gpio", "null", "dma")]


def unshared_ram_devices(directory: Path) -> list[GuestDevice]:
    """The second boot's: a gpio server in its own process (killed), and dmaengine."""
    return [
        # A long reply timeout: an access that waited for a reply would hang the test.
        GuestDevice(directory / "gpio.sock", "gpio", msg_timeout_ms=600_000),
        GuestDevice(directory / "dma.sock", "dma"),
    ]


@pytest.fixture
def qemu() -> Qemu:
    return Qemu.from_environment(modules=True)


def no_errors(tracer: Tracer) -> list[tuple[int, int]]:
    return [(int(r.command), r.errno) for r in tracer.errors()]


@contextmanager
def closed_after(*devices: Device) -> Iterator[None]:
    """Give the devices' memory back however the test ends (the fd-leak check follows)."""
    try:
        yield
    finally:
        for device in devices:
            device.close()


async def test_guest_with_shared_ram_drives_gpio_null_and_dmaengine(
    qemu: Qemu, tmp_path: Path
) -> None:
    gpio, null, engine = GpioDevice(), NullDevice(), DmaEngine()
    tracers = {"gpio": Tracer(), "null": Tracer(), "dma": Tracer()}
    gpio_resets = ResetCounter(gpio)
    initrd = build_initramfs(tmp_path, SHARED_RAM_SCRIPT, qemu.module_files(["gpio-pci-idio-16"]))
    with closed_after(gpio, null, engine):
        async with trio.open_nursery() as nursery:
            servers: dict[str, DeviceServer] = {}
            for name, device in (("gpio", gpio), ("null", null), ("dma", engine)):
                servers[name] = await nursery.start(
                    partial(serve, device, tmp_path / f"{name}.sock", hooks=tracers[name])
                )
            devices = shared_ram_devices(tmp_path)
            async with running_guest(
                qemu, tmp_path, initrd, devices, shared_memory=True, reboot=True
            ) as guest:
                await guest.wait_for("@outputs")
                assert gpio.outputs == 1 << 0 | 1 << 3 | 1 << 9 | 1 << 15
                gpio.set_inputs(0xA5C3)
                await guest.reply()

                await guest.wait_for("@interrupt")
                gpio.set_input(4, not gpio.inputs & 1 << 4)
                await guest.reply()

                await guest.wait_for("@bus-reset")
                resets = gpio_resets.count
                await guest.reply()
                with trio.fail_after(60):
                    await gpio_resets.wait_beyond(resets)

                await guest.wait_for("@unplug")
                await guest.qmp.execute("device_del", id="null")
                with trio.fail_after(60):
                    await guest.qmp.wait_event("DEVICE_DELETED")
                # QEMU has let go of null: the next client is served, nothing of QEMU's left.
                with trio.fail_after(30):
                    async with connect(tmp_path / "null.sock") as client:
                        header = await client.config.header()
                        assert header.device_id == null.identity.device_id
                        assert len(null.dma) == 0
                assert servers["null"].connections == 2
                await guest.reply()

                await guest.wait_for("@system-reset")
                resets = gpio_resets.count
                await guest.qmp.execute("system_reset")
                with trio.fail_after(60):
                    await gpio_resets.wait_beyond(resets)
                await guest.qmp.execute("quit")
            report = report_values(guest.report_lines())
            nursery.cancel_scope.cancel()

    assert report["gpio_driver"] == "pci-idio-16"
    assert int(report["inputs"]) == 0xA5C3
    assert int(report["irqs_after"]) > int(report["irqs_before"])
    assert gpio.state.irq_status == 0  # the driver's handler cleared the latch
    unmasks: list[SetIrqsRequest] = []
    for record in tracers["gpio"].commands(Command.DEVICE_SET_IRQS):
        unmask = record.decode()
        assert isinstance(unmask, SetIrqsRequest)
        unmasks.append(unmask)
    assert any(u.index == PciIrq.INTX and u.flags & IRQ_SET_ACTION_UNMASK for u in unmasks), (
        "QEMU never unmasked INTx after the guest's EOI"
    )
    assert report["dma_copy"] == "identical", report.items()
    assert report["bus_reset"] == "done"
    assert report["null_present"] == "no"
    # Guest RAM is a memfd that DMA_MAP carries (ROMs have none); nothing QEMU sent was refused.
    assert any(r.fd_count for r in tracers["dma"].commands(Command.DMA_MAP))
    assert {name: no_errors(t) for name, t in tracers.items()} == {n: [] for n in tracers}
    # Every example device starts QEMU without a warning (issue 10, item 4).
    assert guest.stderr == ""


async def test_guest_without_shared_ram_survives_a_killed_server(
    qemu: Qemu, tmp_path: Path
) -> None:
    engine = DmaEngine()
    tracer = Tracer()
    initrd = build_initramfs(tmp_path, UNSHARED_RAM_SCRIPT, qemu.module_files(["gpio-pci-idio-16"]))
    gpio_path = tmp_path / "gpio.sock"
    with closed_after(engine):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, engine, tmp_path / "dma.sock", hooks=tracer))
            server = await trio.lowlevel.open_process(
                [*CLI, "serve", "gpio", f"--socket-path={gpio_path}"],
                stderr=subprocess.PIPE,
                env=env(),
            )
            try:
                await wait_until_serving(server)
                devices = unshared_ram_devices(tmp_path)
                async with running_guest(
                    qemu, tmp_path, initrd, devices, shared_memory=False
                ) as guest:
                    await guest.wait_for("@kill")
                    server.kill()
                    await server.wait()
                    await guest.reply()
                    with trio.fail_after(60):
                        await guest.wait_for("@dead-reads")
                    assert (await guest.qmp.execute("query-status"))["status"] == "running"
                    await guest.reply()
            finally:
                if server.returncode is None:
                    server.kill()
                with trio.CancelScope(shield=True):
                    await server.wait()
                assert server.stderr is not None
                await server.stderr.aclose()
            report = report_values(guest.report_lines())
            nursery.cancel_scope.cancel()

    assert report["gpio_driver"] == "pci-idio-16"
    assert report["live_read"] == "0"
    print(f"three reads of the killed device took {report['dead_reads_cs']} centiseconds")
    # Guest RAM has no fd: DMA_MAP carries none, and the engine copies through messages.
    maps = tracer.commands(Command.DMA_MAP)
    assert maps and not any(r.fd_count for r in maps)
    assert no_errors(tracer) == []
    assert report["dma_copy"] == "identical", report  # QEMU's DMA_WRITE layout (item 1)


async def test_write_multiple_is_not_offered_by_default() -> None:
    """QEMU proposes write_multiple; a default server declines it (docs/qemu.md, item 5)."""
    offered = dataclasses.replace(DEFAULT_SERVER_CAPABILITIES, write_multiple=True)
    for capabilities, granted in ((DEFAULT_SERVER_CAPABILITIES, False), (offered, True)):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        device = NullDevice()
        with closed_after(device):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(serve_connection, device, theirs, capabilities=capabilities)
                )
                async with connect(ours, write_multiple=True) as client:
                    assert client.write_multiple == granted


#: Paths docs/qemu.md shows in place of a test's own.
DOCS_QEMU = Qemu(
    binary=Path("qemu-system-x86_64"),
    firmware=(),
    bios=Path("/usr/share/seabios/bios-256k.bin"),
    kernel=Path("bzImage"),
)
DOCS_DIRECTORY = Path("/tmp/vfio-user")


def docs_commands() -> dict[str, str]:
    """The command lines docs/qemu.md shows: the two boots the tests run, and one device."""
    initrd, directory = Path("initrd.gz"), DOCS_DIRECTORY
    boots = {
        "shared": guest_command(
            DOCS_QEMU, directory, initrd, shared_ram_devices(directory),
            shared_memory=True, reboot=True,
        ),
        "unshared": guest_command(
            DOCS_QEMU, directory, initrd, unshared_ram_devices(directory), shared_memory=False
        ),
        "minimal": DOCS_QEMU.command(
            initrd, [GuestDevice(directory / "gpio.sock", "gpio")], shared_memory=True
        ),
    }  # fmt: skip
    return {name: shell_command(argv) for name, argv in boots.items()}


def test_docs_show_the_command_lines_the_tests_run() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "qemu.md").read_text()
    for name, command in docs_commands().items():
        assert command in page, f"docs/qemu.md lacks the {name} command line:\n{command}"
