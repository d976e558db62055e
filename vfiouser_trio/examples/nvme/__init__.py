"""An NVMe 1.4 controller (class 010802) that Linux's ``nvme`` driver binds and uses as a disk.

One namespace backed by memory or a file; admin and I/O queues each served by a trio
task; PRPs walked with every entry checked. See docs/nvme.md for what is implemented
and what is not.

    modules:  spec (numbers), command (a decoded entry), prp (PRP walking), queues,
              identify (Identify data), admin and nvm (command handlers), backing
              (memory, file), keepalive (the Keep Alive Timer), coalescing (interrupt
              coalescing), migration (the state), controller (registers, doorbells,
              interrupts, events, queue tasks)
"""

from __future__ import annotations

import os

from .backing import Backing, FileBacking, MemoryBacking
from .controller import DEFAULT_SIZE, NvmeController
from .identify import ControllerInfo

__all__ = [
    "Backing",
    "ControllerInfo",
    "FileBacking",
    "MemoryBacking",
    "NvmeController",
    "nvme_controller",
]


def nvme_controller(backing: str | None = None, size: int | None = None) -> NvmeController:
    """The controller ``vfio-user-trio serve nvme [--backing FILE] [--size N]`` serves.

    Without ``backing`` the namespace is ``size`` bytes of memory (64 MiB by default).
    With it, the namespace is the file: ``size`` bytes (the file is extended if shorter),
    or by default the file's own size, rounded down to whole 512-byte blocks.
    """
    if backing is None:
        return NvmeController(MemoryBacking(size or DEFAULT_SIZE))
    if size is None:
        size = os.stat(backing).st_size // 512 * 512 if os.path.exists(backing) else DEFAULT_SIZE
    return NvmeController(FileBacking(backing, size))
