"""Doorbells: ioeventfds a device declares on a region (VFIO_USER_DEVICE_GET_REGION_IO_FDS).

The server creates one eventfd per doorbell and hands a copy to the client, which
may register it with KVM (KVM_IOEVENTFD) so guest writes wake the device directly.
A write that reaches the server as REGION_WRITE instead rings the same doorbell, so
a device awaits ``doorbell.wait()`` whichever way the write came.

The client holds the same open file description as we do, so it can clear
``O_NONBLOCK`` or fill the counter at will. ``EventFd`` relies on neither: waiting
reads with RWF_NOWAIT, and ringing a full doorbell is a no-op (it is rung already).
A client keeps its copy after it disconnects, so each doorbell gets a fresh eventfd
when a client goes (``renew``): a former client cannot ring the next one's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ..eventfd import EventFd
from ..protocol.constants import KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_PIO


@dataclass(eq=False)
class Doorbell:
    """A write-triggered notification on ``size`` bytes at ``offset`` of a region.

    ``size`` 0 matches any access size at ``offset``; ``datamatch`` restricts the
    doorbell to writes of that value (little-endian, ``size`` bytes).
    """

    offset: int
    size: int = 4
    datamatch: int | None = None
    pio: bool = False
    _event: EventFd = field(default_factory=EventFd, repr=False)

    @property
    def kvm_flags(self) -> int:
        flags = KVM_IOEVENTFD_FLAG_DATAMATCH if self.datamatch is not None else 0
        return flags | (KVM_IOEVENTFD_FLAG_PIO if self.pio else 0)

    def fileno(self) -> int:
        """The doorbell's eventfd (the doorbell keeps owning it)."""
        return self._event.fileno()

    def matches(self, offset: int, data: bytes) -> bool:
        if offset != self.offset:
            return False
        if self.size and len(data) != self.size:
            return False
        return self.datamatch is None or int.from_bytes(data, "little") == self.datamatch

    def ring(self) -> None:
        """Signal the doorbell from this process; a full counter means it is rung already."""
        self._event.signal()

    def ring_on_write(self, offset: int, data: bytes) -> None:
        if self.matches(offset, data):
            self.ring()

    async def wait(self) -> int:
        """Wait until the doorbell rings; returns how many rings were coalesced.

        ``trio.ClosedResourceError`` once the doorbell is closed; a ``renew`` while
        waiting just moves the wait to the new eventfd.
        """
        while True:
            event = self._event
            try:
                return await event.wait()
            except trio.ClosedResourceError:
                if self._event is event:
                    raise

    def renew(self) -> None:
        """Replace the eventfd (the client that had a copy of it is gone).

        Rings still pending on the old one are dropped with it: they came from, or
        through, the client that left.
        """
        if self._event.closed:
            return  # closed for good
        old, self._event = self._event, EventFd()
        old.close()

    def close(self) -> None:
        self._event.close()
