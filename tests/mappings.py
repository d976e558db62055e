"""What this process has mapped, from /proc/self/maps (for tests of mmap lifetimes), and
region memory whose file can shrink under a mapping."""

from __future__ import annotations

import os


def is_mapped(address: int) -> bool:
    """Whether ``address`` lies inside any mapping of this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


class ShrinkableMemory:
    """Region memory whose fd the client cannot seal (as a libvfio-user temporary file);
    the server answers messages from a separate buffer, so a message shows what it holds."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("shrinkable", os.MFD_CLOEXEC)  # no sealing: can shrink
        os.ftruncate(self.fd, size)
        self.view = memoryview(bytearray(size))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
