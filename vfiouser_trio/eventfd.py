"""Owned, non-blocking eventfds (interrupts and doorbells) that trio tasks can await.

Built on ``os.eventfd`` and friends, which cover everything needed; the fd is always
``O_NONBLOCK`` so that reads never stall the trio loop.
"""

from __future__ import annotations

import contextlib
import os
from types import TracebackType
from typing import Self

import trio

__all__ = ["EVENTFD_MAX", "EventFd"]

#: The largest value an eventfd counter can hold (a write that would pass it blocks).
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE


class EventFd:
    """An owned eventfd.

    In normal mode a read returns the whole counter and resets it to zero; in
    semaphore mode a read returns 1 and decrements the counter. Closing is
    idempotent and wakes any task blocked in ``wait()`` with
    ``trio.ClosedResourceError``; using a closed EventFd raises the same.
    """

    __slots__ = ("_fd",)

    def __init__(self, initval: int = 0, *, semaphore: bool = False, cloexec: bool = True) -> None:
        """Create an eventfd whose counter starts at ``initval`` (0 .. 2**32-1)."""
        if not 0 <= initval <= 0xFFFF_FFFF:
            raise ValueError(f"eventfd initial value {initval} is not a u32")
        flags = os.EFD_NONBLOCK
        if cloexec:
            flags |= os.EFD_CLOEXEC
        if semaphore:
            flags |= os.EFD_SEMAPHORE
        self._fd = os.eventfd(initval, flags)

    @classmethod
    def from_fd(cls, fd: int) -> EventFd:
        """Adopt ``fd`` (e.g. received with SCM_RIGHTS); the EventFd now owns it.

        Sets ``O_NONBLOCK``, which is a property of the open file description and so
        also seen by any other holder of the same description (the sending peer).
        """
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd}")
        os.set_blocking(fd, False)
        self = cls.__new__(cls)
        self._fd = fd
        return self

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd number; ``trio.ClosedResourceError`` once closed or detached."""
        if self._fd < 0:
            raise trio.ClosedResourceError("eventfd is closed")
        return self._fd

    def signal(self, n: int = 1) -> None:
        """Add ``n`` to the counter; ``BlockingIOError`` if it would pass ``EVENTFD_MAX``."""
        if not 1 <= n <= EVENTFD_MAX:
            raise ValueError(f"eventfd increment {n} is outside 1..{EVENTFD_MAX:#x}")
        os.eventfd_write(self.fileno(), n)

    def try_read(self) -> int | None:
        """Consume the counter (or 1 of it, in semaphore mode); ``None`` if it is zero."""
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return None

    async def wait(self) -> int:
        """Wait until the counter is non-zero, then consume it like ``try_read``.

        One task at a time: a second concurrent ``wait`` raises ``trio.BusyResourceError``
        (trio's rule for an fd), unless the counter is already non-zero.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            value = self.try_read()
            if value is not None:
                if not waited:
                    # No schedule point yet: add one, without a cancellation point (the
                    # value is consumed). After wait_readable there was one already.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return value
            # Another reader may win the race after readability: loop and retry.
            await trio.lowlevel.wait_readable(self.fileno())
            waited = True

    def detach(self) -> int:
        """Give up ownership and return the fd; the EventFd is then closed."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the fd (idempotent), first waking trio tasks waiting on it."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        # Outside trio.run (RuntimeError) nobody can be waiting in this thread's loop.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(fd)
        os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Without notify_closing: a task waiting on it would hold a reference.
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<EventFd fd={self._fd}>" if self._fd >= 0 else "<EventFd closed>"
