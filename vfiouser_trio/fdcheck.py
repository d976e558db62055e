"""Checks on file descriptors received from a peer, made before the fd is used.

A peer may send any fd where the protocol expects an eventfd or a memory file: a
directory, a pipe, a socket, a device node. Using such an fd can raise later, in a
task that cannot handle it, or block the event loop. Every received fd is therefore
checked for its kind when it arrives and refused with EINVAL when it is the wrong
kind, so the error reaches the peer that sent it and nothing else.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat

from .protocol.errors import VfioUserError

__all__ = ["FdKind", "MemoryFile", "fd_kind", "file_seals", "require_eventfd", "require_memory_fd"]


class FdKind(enum.Enum):
    """What a file descriptor refers to, as far as the protocol cares."""

    EVENTFD = "eventfd"
    MEMFD = "memfd"
    FILE = "regular file"  # tmpfs, hugetlbfs or any other regular file
    OTHER = "other"


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def fd_kind(fd: int) -> FdKind:
    """Classify ``fd``; ``VfioUserError(EBADF)`` if it is not open."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise VfioUserError(errno.EBADF, f"fd {fd} is not open") from exc
    if stat.S_ISREG(st.st_mode):
        return FdKind.MEMFD if _link(fd).startswith("/memfd:") else FdKind.FILE
    # Anonymous inodes (eventfd, epoll, timerfd, ...) are told apart by their link name.
    if _link(fd) == "anon_inode:[eventfd]":
        return FdKind.EVENTFD
    return FdKind.OTHER


def require_eventfd(fd: int, what: str) -> None:
    """Refuse (EINVAL) an fd that is not an eventfd; ``what`` names its use in the error."""
    kind = fd_kind(fd)
    if kind is not FdKind.EVENTFD:
        raise VfioUserError(errno.EINVAL, f"{what}: expected an eventfd, got {kind.value}")


class MemoryFile:
    """What ``require_memory_fd`` learnt about a memory fd: its identity, size and seals."""

    __slots__ = ("device", "inode", "kind", "seals", "size")

    def __init__(self, kind: FdKind, st: os.stat_result, seals: int) -> None:
        self.kind = kind
        self.device = st.st_dev
        self.inode = st.st_ino
        self.size = st.st_size
        #: F_SEAL_* bits in force (0 for files that cannot be sealed).
        self.seals = seals

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): the same file whichever fd it came through."""
        return (self.device, self.inode)

    @property
    def cannot_shrink(self) -> bool:
        """True when the file can never become shorter (F_SEAL_SHRINK is in force)."""
        return bool(self.seals & fcntl.F_SEAL_SHRINK)


def file_seals(fd: int) -> int:
    """The seals on ``fd``; 0 for a file that does not support sealing."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return 0


def require_memory_fd(fd: int, what: str, *, end: int) -> MemoryFile:
    """Refuse (EINVAL) an fd that is not a memfd or regular file at least ``end`` bytes long.

    A mapping past the end of the file would fault (SIGBUS) on first access, so the
    range a message asks to map must lie inside the file as it is now.
    """
    kind = fd_kind(fd)
    if kind not in (FdKind.MEMFD, FdKind.FILE):
        raise VfioUserError(
            errno.EINVAL, f"{what}: expected a memfd or regular file, got {kind.value}"
        )
    st = os.fstat(fd)
    if st.st_size < end:
        raise VfioUserError(
            errno.EINVAL, f"{what}: the file holds {st.st_size:#x} bytes, the map needs {end:#x}"
        )
    return MemoryFile(kind, st, file_seals(fd))
