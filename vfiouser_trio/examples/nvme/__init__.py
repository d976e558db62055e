"""An NVMe 1.4 controller (class 010802) that Linux's ``nvme`` driver binds and uses as a disk.

One namespace backed by memory or a file; admin and I/O queues each served by a trio
task; PRPs walked with every entry checked. See docs/nvme.md for what is implemented
and what is not.

    modules:  spec (numbers), command (a decoded entry), prp (PRP walking), queues,
              identify (Identify data), admin and nvm (command handlers), backing
              (memory, file), controller (registers, doorbells, queue tasks)
"""

from __future__ import annotations

from .backing import Backing, FileBacking, MemoryBacking
from .controller import NvmeController
from .identify import ControllerInfo

__all__ = ["Backing", "ControllerInfo", "FileBacking", "MemoryBacking", "NvmeController"]
