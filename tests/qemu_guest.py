"""A real vfio-user client for tests: QEMU's vfio-user-pci with a tiny Linux guest.

The QEMU, firmware and guest kernel come from the environment that
``../shared/qemu/provision.sh`` writes (``.ci/run`` sources it); point the variables at
your own build to use another QEMU (10.1 or newer, with ``vfio-user-pci``):

    VFIO_USER_QEMU            qemu-system-x86_64
    VFIO_USER_QEMU_FIRMWARE   directories for -L, separated by ':'
    VFIO_USER_QEMU_BIOS       SeaBIOS bios-256k.bin
    VFIO_USER_GUEST_KERNEL    a bzImage (Linux 6.1 is what CI boots)
    VFIO_USER_GUEST_MODULES   that kernel's /lib/modules/<version> (tests that load drivers)

Without them, tests that need a guest skip with the reason. The guest's user space is a
busybox-static initramfs built per test: ``/init`` loads the modules the test asked for,
runs the test's shell script, prints its output between two markers on the serial console
(ttyS0, QEMU's stdout) and powers off.

The test and the guest talk while it runs (`Guest`): the script prints lines on ttyS0,
which the test waits for; the test answers on a second serial port, ttyS1, which the
script reads as fd 3 (``read -r reply <&3``). The QMP monitor is `Guest.qmp`. Both
sockets are listened on by the test and connected to by QEMU as it starts, so there is
nothing to wait for.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

REPORT_BEGIN = "=== guest report begins ==="
REPORT_END = "=== guest report ends ==="
#: How long one guest may take from QEMU's start to its power-off (TCG, a loaded 2-core VM).
GUEST_TIMEOUT = 240.0
#: Guest RAM, and the 1 MiB of it the kernel leaves alone (``memmap=``) so that a script
#: can hand it to a device as DMA buffers through /dev/mem.
GUEST_RAM = "256M"
DMA_SCRATCH = 0x0700_0000
DMA_SCRATCH_SIZE = 0x10_0000

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /modules/$m || echo "insmod $m failed"; done
exec 3</dev/ttyS1
stty -F /dev/ttyS1 raw -echo
echo "{begin}"
sh /report.sh 2>&1
echo "{end}"
poweroff -f
"""


@dataclass(frozen=True, slots=True)
class GuestDevice:
    """One ``vfio-user-pci`` in the guest, on its own PCIe root port (so a bus reset and
    hot-unplug reach it alone); ``id`` is its QEMU id (for ``device_del``)."""

    socket: Path
    id: str = "dev0"
    #: QEMU's ``x-msg-timeout``: how long it waits for a reply (None: its default, 5 s).
    msg_timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Qemu:
    """Where the QEMU binary, its firmware and the guest kernel (and modules) are."""

    binary: Path
    firmware: tuple[Path, ...]
    bios: Path
    kernel: Path
    modules: Path | None = None

    @classmethod
    def from_environment(cls, *, modules: bool = False) -> Qemu:
        """The provisioned QEMU, or ``pytest.skip`` naming what is missing."""
        names = ["VFIO_USER_QEMU", "VFIO_USER_QEMU_FIRMWARE", "VFIO_USER_QEMU_BIOS",
                 "VFIO_USER_GUEST_KERNEL"]  # fmt: skip
        if modules:
            names.append("VFIO_USER_GUEST_MODULES")
        missing = [name for name in names if not os.environ.get(name)]
        if missing:
            pytest.skip(
                f"no QEMU to test with: {', '.join(missing)} unset "
                "(source the env file ../shared/qemu/provision.sh prints)"
            )
        if shutil.which("busybox") is None or shutil.which("cpio") is None:
            pytest.skip("busybox-static and cpio are needed to build the guest's initramfs")
        module_dir = os.environ.get("VFIO_USER_GUEST_MODULES")
        return cls(
            binary=Path(os.environ["VFIO_USER_QEMU"]),
            firmware=tuple(Path(p) for p in os.environ["VFIO_USER_QEMU_FIRMWARE"].split(":")),
            bios=Path(os.environ["VFIO_USER_QEMU_BIOS"]),
            kernel=Path(os.environ["VFIO_USER_GUEST_KERNEL"]),
            modules=Path(module_dir) if module_dir else None,
        )

    def command(
        self,
        initrd: Path,
        devices: Sequence[GuestDevice],
        *,
        shared_memory: bool,
        control: Path | None = None,
        qmp: Path | None = None,
        reboot: bool = False,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """QEMU's command line: a q35 guest with our devices.

        ``shared_memory`` backs guest RAM with a memfd, so DMA_MAP carries fds; without it
        guest RAM has no fd and the device reaches it with DMA_READ/DMA_WRITE messages.
        ``control`` and ``qmp`` are sockets QEMU connects to (ttyS1 and the QMP monitor).
        Without ``reboot`` a guest reset makes QEMU exit (``-no-reboot``); with it, a reset
        (QMP ``system_reset``) restarts the guest. ``extra`` arguments go last (e.g. a
        QEMU-emulated device to compare ours with).
        """
        backend = (
            f"memory-backend-memfd,id=mem,size={GUEST_RAM},share=on"
            if shared_memory
            else f"memory-backend-ram,id=mem,size={GUEST_RAM}"
        )
        argv = [str(self.binary)]
        for directory in self.firmware:
            argv += ["-L", str(directory)]
        argv += [
            "-bios", str(self.bios),
            "-m", GUEST_RAM,
            "-object", backend,
            "-machine", "q35,memory-backend=mem",
            "-display", "none", "-vga", "none", "-nic", "none",
            "-serial", "stdio",
        ]  # fmt: skip
        if control is not None:
            argv += ["-serial", f"unix:{control}"]
        if qmp is not None:
            argv += ["-chardev", f"socket,id=qmp,path={qmp}", "-mon", "chardev=qmp,mode=control"]
        if not reboot:
            argv.append("-no-reboot")
        argv += [
            "-kernel", str(self.kernel),
            "-initrd", str(initrd),
            "-append",
            f"console=ttyS0 panic=-1 quiet memmap={DMA_SCRATCH_SIZE:#x}${DMA_SCRATCH:#x}",
        ]  # fmt: skip
        for chassis, device in enumerate(devices, start=1):
            port = f"{device.id}-port"
            spec: dict[str, object] = {"driver": "vfio-user-pci", "id": device.id, "bus": port,
                    "socket": {"path": str(device.socket), "type": "unix"}}  # fmt: skip
            if device.msg_timeout_ms is not None:
                spec["x-msg-timeout"] = device.msg_timeout_ms
            argv += [
                "-device", f"pcie-root-port,id={port},chassis={chassis}",
                "-device", json.dumps(spec, separators=(",", ":")),
            ]  # fmt: skip
        return argv + list(extra)

    def module_files(self, names: Sequence[str]) -> list[Path]:
        """The .ko files of ``names`` and of what they depend on, dependencies first."""
        if self.modules is None:
            pytest.skip("VFIO_USER_GUEST_MODULES unset: no guest kernel modules to load")
        index = {
            path.name.split(".ko")[0].replace("-", "_"): path
            for path in (self.modules / "kernel").rglob("*.ko*")
        }
        order: list[Path] = []

        def visit(name: str) -> None:
            path = index.get(name.replace("-", "_"))
            if path is None:
                raise AssertionError(f"guest kernel module {name} not in {self.modules}")
            if path in order:
                return
            depends = subprocess.run(
                ["modinfo", "-F", "depends", str(path)],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            for dependency in filter(None, depends.split(",")):
                visit(dependency)
            order.append(path)

        for name in names:
            visit(name)
        return order


def guest_command(
    qemu: Qemu,
    directory: Path,
    initrd: Path,
    devices: Sequence[GuestDevice],
    *,
    shared_memory: bool,
    reboot: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command `running_guest` runs: its control port and QMP sockets in ``directory``."""
    return qemu.command(
        initrd, devices, shared_memory=shared_memory, control=directory / "control.sock",
        qmp=directory / "qmp.sock", reboot=reboot, extra=extra,
    )  # fmt: skip


def shell_command(argv: Sequence[str]) -> str:
    """``argv`` for a shell, one option and its value per line (as docs/qemu.md shows it)."""
    lines = [shlex.quote(argv[0])]
    for arg in argv[1:]:
        if arg.startswith("-") or len(lines) == 1:
            lines.append(shlex.quote(arg))
        else:
            lines[-1] += " " + shlex.quote(arg)
    return " \\\n    ".join(lines)


def build_initramfs(
    directory: Path, script: str, modules: Sequence[Path] = (), programs: Sequence[Path] = ()
) -> Path:
    """A gzipped newc initramfs in ``directory`` whose /init loads ``modules`` (in order,
    as `Qemu.module_files` lists them) and runs ``script`` (sh); ``programs`` (static
    executables) go in /bin."""
    root = directory / "initramfs"
    for sub in ("bin", "proc", "sys", "dev", "tmp", "modules"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy(busybox, root / "bin" / "busybox")
    for program in programs:
        shutil.copy(program, root / "bin" / program.name)
    names = []
    for module in modules:
        name = module.name.split(".ko")[0] + ".ko"
        data = module.read_bytes()
        if module.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif not module.name.endswith(".ko"):
            raise AssertionError(f"cannot unpack {module}")
        (root / "modules" / name).write_bytes(data)
        names.append(name)
    (root / "modules.order").write_text("".join(f"{name}\n" for name in names))
    init = root / "init"
    init.write_text(_INIT.format(begin=REPORT_BEGIN, end=REPORT_END))
    init.chmod(0o755)
    (root / "report.sh").write_text(script)
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc"],
        input="\n".join([".", *paths]).encode(),
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    initrd = directory / "initrd.gz"
    initrd.write_bytes(gzip.compress(archive, compresslevel=1))
    return initrd


def guest_report(console: str) -> list[str]:
    """The lines the guest script printed; AssertionError if the guest never finished it."""
    if REPORT_BEGIN not in console or REPORT_END not in console:
        raise AssertionError(f"the guest did not finish its script; console:\n{console[-3000:]}")
    body = console.split(REPORT_BEGIN, 1)[1].split(REPORT_END, 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def report_values(lines: Sequence[str]) -> dict[str, str]:
    """``key=value`` lines of a guest report as a dict (a later line wins)."""
    return dict(
        line.split("=", 1) for line in lines if "=" in line and " " not in line.split("=")[0]
    )


class Qmp:
    """QEMU's monitor: commands in order, events kept for `wait_event`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self._lock = trio.Lock()

    async def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise ConnectionError("QEMU closed its monitor")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    async def _handshake(self) -> None:
        greeting = await self._message()
        assert "QMP" in greeting, greeting
        await self.execute("qmp_capabilities")

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value, AssertionError for an ``error``."""
        async with self._lock:
            request: dict[str, Any] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            await self._stream.send_all(json.dumps(request).encode() + b"\n")
            while True:
                message = await self._message()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    raise AssertionError(f"QMP {command}: {message['error']}")
                return message["return"]

    async def wait_event(self, name: str) -> dict[str, Any]:
        """The first event called ``name`` (already seen or the next to come)."""
        async with self._lock:
            while True:
                for event in self.events:
                    if event["event"] == name:
                        self.events.remove(event)
                        return event
                self.events.append(await self._message())


class Guest:
    """A running QEMU: its console lines as they come, its control port and monitor."""

    def __init__(self, process: trio.Process, control: trio.SocketStream, qmp: Qmp) -> None:
        self.process = process
        self.qmp = qmp
        self._control = control
        self._console = bytearray()
        self._stderr = bytearray()
        self._progress = trio.Event()
        self._ended = False

    @property
    def console(self) -> str:
        return self._console.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    async def _pump(self, stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        while chunk := await stream.receive_some():
            into += chunk
            self._wake()
        if into is self._console:  # QEMU's stdout closed: it has exited
            self._ended = True
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def wait_for(self, text: str) -> None:
        """Until the console shows ``text``; AssertionError if QEMU exits first."""
        while text not in self.console:
            if self._ended:
                raise AssertionError(
                    f"QEMU exited before the guest printed {text!r}; console:\n"
                    f"{self.console[-3000:]}\nstderr:\n{self.stderr}"
                )
            await self._progress.wait()

    async def reply(self, line: str = "go") -> None:
        """A line for the guest script's ``read -r reply <&3``."""
        await self._control.send_all(line.encode() + b"\n")

    def report(self) -> list[str]:
        """The whole report of a guest that powered off (see `guest_report`)."""
        return guest_report(self.console)

    def report_lines(self) -> list[str]:
        """What the script printed so far (a guest stopped mid-script: reset, quit)."""
        if REPORT_BEGIN not in self.console:
            raise AssertionError(f"the guest never ran its script; console:\n{self.console}")
        body = self.console.split(REPORT_BEGIN, 1)[1].split(REPORT_END, 1)[0]
        return [line.strip() for line in body.splitlines() if line.strip()]


async def _accept_one(listener: socket.socket) -> trio.SocketStream:
    sock = trio.socket.from_stdlib_socket(listener)
    connection, _ = await sock.accept()
    return trio.SocketStream(connection)


@asynccontextmanager
async def running_guest(
    qemu: Qemu,
    directory: Path,
    initrd: Path,
    devices: Sequence[GuestDevice],
    *,
    shared_memory: bool,
    reboot: bool = False,
    extra: Sequence[str] = (),
) -> AsyncIterator[Guest]:
    """QEMU running the guest (``extra``: more QEMU arguments); on leaving, waits for it to
    power off (`GUEST_TIMEOUT` in all), then for the process. QEMU still running then is
    killed and the test fails."""
    listeners = []
    for path in (directory / "control.sock", directory / "qmp.sock"):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listeners.append(listener)
    argv = guest_command(
        qemu, directory, initrd, devices, shared_memory=shared_memory, reboot=reboot, extra=extra
    )
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    guest: Guest | None = None
    try:
        with trio.fail_after(GUEST_TIMEOUT):
            control = await _accept_one(listeners[0])
            qmp = Qmp(await _accept_one(listeners[1]))
            await qmp._handshake()
            guest = Guest(process, control, qmp)
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None and process.stderr is not None
                nursery.start_soon(guest._pump, process.stdout, guest._console)
                nursery.start_soon(guest._pump, process.stderr, guest._stderr)
                yield guest
                await process.wait()
            await control.aclose()
            await qmp._stream.aclose()
    except BaseException:
        if guest is not None:  # pytest shows it with the failure
            print(f"guest console:\n{guest.console}\nQEMU's stderr:\n{guest.stderr}")
        raise
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        for listener in listeners:
            listener.close()
