"""Linux 6.1's nvme driver uses the NVMe example as a disk, in one QEMU boot.

The guest's ``nvme`` driver binds the controller (served in the test process, the
namespace in a file), the disk has the configured size, an ext2 filesystem (busybox
mke2fs, mounted by ext4) is created, mounted, written, synced, unmounted and mounted
again with the checksum unchanged; the backing file on the host holds what the guest
wrote; a reset of the function from the guest (the driver's reset_prepare/reset_done
around QEMU's DEVICE_RESET) leaves a disk that still reads the same. Guest RAM is
shared by memfd, so the controller reaches the queues and data directly.

Skipped without a provisioned QEMU (see tests/qemu_guest.py and docs/qemu.md).
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import pytest
import trio

from bench.figures.nvme import METRICS, build_nvbench
from tests.qemu_guest import GuestDevice, Qemu, build_initramfs, report_values, running_guest
from vfiouser_trio.examples.nvme import FileBacking, NvmeController
from vfiouser_trio.server import serve
from vfiouser_trio.testing import Tracer

pytestmark = pytest.mark.usefixtures("no_fd_leak")

DISK_SIZE = 64 << 20
#: What the guest writes into the filesystem besides 256 KiB of random bytes: ``seq`` of
#: these numbers, 512 KiB the test finds in the backing file (no two 4 KiB blocks alike).
PATTERN = range(1_000_000, 1_065_536)

SCRIPT = (
    r"""
pci() { for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "$1" ] && echo $d; done; }
host() { echo "@$1"; read -r reply <&3; }
NVME=$(pci 0x1234:0x7102)
i=0; while [ ! -e /sys/block/nvme0n1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "nvme_driver=$(basename $(readlink $NVME/driver))"
echo "disk_sectors=$(cat /sys/block/nvme0n1/size)"
echo "queues=$(ls /sys/block/nvme0n1/mq | wc -l)"
mke2fs -F /dev/nvme0n1 >/dev/null 2>&1 && echo mkfs=ok
mkdir -p /mnt
mount -t ext2 /dev/nvme0n1 /mnt && echo mount=ok
seq PATTERN_FIRST PATTERN_LAST >/mnt/pattern
dd if=/dev/urandom of=/mnt/random bs=4096 count=64 2>/dev/null
sums() { cat /mnt/pattern /mnt/random | md5sum | cut -d' ' -f1; }
written=$(sums)
sync
umount /mnt && echo umount=ok
mount -t ext2 /dev/nvme0n1 /mnt && echo remount=ok
[ "$(sums)" = $written ] && echo files_match=yes
umount /mnt
echo "disk_md5=$(md5sum /dev/nvme0n1 | cut -d' ' -f1)"
host check
echo 1 >$NVME/reset && echo reset=done
echo "after_reset_md5=$(md5sum /dev/nvme0n1 | cut -d' ' -f1)"
mount -t ext2 /dev/nvme0n1 /mnt && [ "$(sums)" = $written ] && echo after_reset_match=yes
umount /mnt
nvbench /dev/nvme0n1 1 16 | sed 's/^/nvbench_/'
host grow
i=0; while [ "$(cat /sys/block/nvme0n1/size)" = DISK_SECTORS ] && [ $i -lt 300 ]; do
  sleep 0.1; i=$((i + 1)); done
echo "grown_sectors=$(cat /sys/block/nvme0n1/size)"
grep nvme0q /proc/interrupts | sed 's/^ */irq: /'
echo "msi_vectors=$(grep -c 'MSI.*nvme0q' /proc/interrupts)"
echo "nvme_complaints=$(dmesg | grep -c -i -E 'nvme.*(error|timeout|abort|invalid|fail|warn)')"
""".replace("PATTERN_FIRST", str(PATTERN[0]))
    .replace("PATTERN_LAST", str(PATTERN[-1]))
    .replace("DISK_SECTORS", str(DISK_SIZE // 512))
)


def pattern() -> bytes:
    return b"".join(b"%d\n" % i for i in PATTERN)


@pytest.fixture
def qemu() -> Qemu:
    return Qemu.from_environment(modules=True)


async def test_linux_nvme_driver_formats_mounts_and_uses_the_disk(
    qemu: Qemu, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    device = NvmeController(FileBacking(disk, DISK_SIZE))
    tracer = Tracer()
    modules = qemu.module_files(["nvme", "ext4", "crc32c_generic"])
    # The benchmark's guest tool (python -m bench nvme) runs one tiny pass at the end.
    initrd = build_initramfs(tmp_path, SCRIPT, modules, [build_nvbench(tmp_path)])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, device, tmp_path / "nvme.sock", hooks=tracer))
            devices = [GuestDevice(tmp_path / "nvme.sock", "nvme")]
            async with running_guest(qemu, tmp_path, initrd, devices, shared_memory=True) as guest:
                await guest.wait_for("@check")
                # Unmounted and synced: the file holds the filesystem the guest wrote.
                image = await trio.to_thread.run_sync(disk.read_bytes)
                shadow_doorbells = device.shadow is not None  # Linux took OACS bit 8
                await guest.reply()
                # The namespace grows: a Namespace Attribute Changed notice; Linux rescans.
                await guest.wait_for("@grow")
                await device.grow(2 * DISK_SIZE)
                await guest.reply()
            report = report_values(guest.report())
            nursery.cancel_scope.cancel()
    finally:
        device.close()

    assert report["nvme_driver"] == "nvme", report
    assert shadow_doorbells
    assert int(report["disk_sectors"]) * 512 == DISK_SIZE
    assert int(report["queues"]) >= 1
    assert (report["mkfs"], report["mount"], report["umount"], report["remount"]) == (
        "ok", "ok", "ok", "ok",
    )  # fmt: skip
    assert report["files_match"] == "yes"
    assert report["disk_md5"] == hashlib.md5(image).hexdigest()
    assert pattern()[:4096] in image and pattern()[-4096:] in image
    assert report["reset"] == "done"
    assert report["after_reset_md5"] == report["disk_md5"]
    assert report["after_reset_match"] == "yes"
    # A vector per queue pair (the device has MSI-X and no MSI, which Linux 6.1 lists as MSI).
    assert int(report["msi_vectors"]) == int(report["queues"]) + 1, guest.report()
    assert report["nvme_complaints"] == "0"
    assert int(report["grown_sectors"]) * 512 == 2 * DISK_SIZE
    assert all(float(report[f"nvbench_{key}"]) > 0 for key, _, _ in METRICS), report
    assert [(int(r.command), r.errno) for r in tracer.errors()] == []
    assert guest.stderr == ""
