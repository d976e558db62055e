"""What this process has mapped, from /proc/self/maps (for tests of mmap lifetimes)."""

from __future__ import annotations


def is_mapped(address: int) -> bool:
    """Whether ``address`` lies inside any mapping of this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False
