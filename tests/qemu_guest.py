"""A real vfio-user client for tests: QEMU's vfio-user-pci with a tiny Linux guest.

The QEMU, firmware and guest kernel come from the environment that
``../shared/qemu/provision.sh`` writes (``.ci/run`` sources it); point the variables at
your own build to use another QEMU (10.1 or newer, with ``vfio-user-pci``):

    VFIO_USER_QEMU            qemu-system-x86_64
    VFIO_USER_QEMU_FIRMWARE   directories for -L, separated by ':'
    VFIO_USER_QEMU_BIOS       SeaBIOS bios-256k.bin
    VFIO_USER_GUEST_KERNEL    a bzImage (Linux 6.1 is what CI boots)

Without them, tests that need a guest skip with the reason. The guest's user space is a
busybox-static initramfs built per test: ``/init`` runs the test's shell script, prints
its output between two markers on the serial console and powers off.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPORT_BEGIN = "=== guest report begins ==="
REPORT_END = "=== guest report ends ==="
#: How long one guest may take from QEMU's start to its power-off (TCG, a loaded 2-core VM).
GUEST_TIMEOUT = 240.0

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "{begin}"
sh /report.sh 2>&1
echo "{end}"
poweroff -f
"""


@dataclass(frozen=True, slots=True)
class Qemu:
    """Where the QEMU binary, its firmware and the guest kernel are."""

    binary: Path
    firmware: tuple[Path, ...]
    bios: Path
    kernel: Path

    @classmethod
    def from_environment(cls) -> Qemu:
        """The provisioned QEMU, or ``pytest.skip`` naming what is missing."""
        names = ("VFIO_USER_QEMU", "VFIO_USER_QEMU_FIRMWARE", "VFIO_USER_QEMU_BIOS",
                 "VFIO_USER_GUEST_KERNEL")
        missing = [name for name in names if not os.environ.get(name)]
        if missing:
            pytest.skip(
                f"no QEMU to test with: {', '.join(missing)} unset "
                "(source the env file ../shared/qemu/provision.sh prints)"
            )
        if shutil.which("busybox") is None or shutil.which("cpio") is None:
            pytest.skip("busybox-static and cpio are needed to build the guest's initramfs")
        return cls(
            binary=Path(os.environ["VFIO_USER_QEMU"]),
            firmware=tuple(Path(p) for p in os.environ["VFIO_USER_QEMU_FIRMWARE"].split(":")),
            bios=Path(os.environ["VFIO_USER_QEMU_BIOS"]),
            kernel=Path(os.environ["VFIO_USER_GUEST_KERNEL"]),
        )

    def command(self, socket_path: Path, initrd: Path, *, shared_memory: bool) -> list[str]:
        """QEMU's command line: a q35 guest with our device on ``socket_path``.

        ``shared_memory`` backs guest RAM with a memfd, so DMA_MAP carries fds; without it
        guest RAM has no fd and the device reaches it with DMA_READ/DMA_WRITE messages.
        """
        backend = (
            "memory-backend-memfd,id=mem,size=256M,share=on"
            if shared_memory
            else "memory-backend-ram,id=mem,size=256M"
        )
        argv = [str(self.binary)]
        for directory in self.firmware:
            argv += ["-L", str(directory)]
        argv += [
            "-bios", str(self.bios),
            "-m", "256M",
            "-object", backend,
            "-machine", "q35,memory-backend=mem",
            "-display", "none", "-vga", "none", "-nic", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(self.kernel),
            "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet",
            "-device",
            f'{{"driver":"vfio-user-pci","socket":{{"path":"{socket_path}","type":"unix"}}}}',
        ]  # fmt: skip
        return argv


def build_initramfs(directory: Path, script: str) -> Path:
    """A gzipped newc initramfs in ``directory`` whose /init runs ``script`` (sh)."""
    root = directory / "initramfs"
    for sub in ("bin", "proc", "sys", "dev"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy(busybox, root / "bin" / "busybox")
    init = root / "init"
    init.write_text(_INIT.format(begin=REPORT_BEGIN, end=REPORT_END))
    init.chmod(0o755)
    (root / "report.sh").write_text(script)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc"],
        input="\n".join([".", *names]).encode(),
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
