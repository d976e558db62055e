"""Failures of device code, explained where they happen.

When the device's own code fails while serving a client command (a region callback
raising, or returning something other than the bytes asked for; ``reset()`` or
``attached()`` raising) the client gets EIO, as it would from a broken device, and the
failure is logged at WARNING naming the device, the command, the region and offset, with
the device's traceback. ``detached()`` and ``run()`` raising are logged and reported the
same way; a failed ``run()`` ends its device's service (``DeviceRuntime.run``). A
DMA access of the device that fails inside a callback (an address the client never
mapped, say) is the client's errno (EFAULT) and a WARNING too, but not a device bug.

Listeners receive each device bug as a :class:`DeviceCodeError`: ``nested_device`` and the
``vfio_pair`` fixture collect them and raise them into the test (docs/testing.md).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from ..protocol.constants import PciRegion
from ..protocol.errors import VfioUserError

log = logging.getLogger(__name__)


def region_name(index: int) -> str:
    """``BAR0`` for region 0, ``ROM``, ``CONFIG``, ``VGA``, else ``region 9``."""
    try:
        return PciRegion(index).name
    except ValueError:
        return f"region {index}"


class DeviceCodeError(Exception):
    """Device code failed while serving ``command``; ``__cause__`` is its own exception."""

    def __init__(self, device: str, command: str, where: str, reason: str) -> None:
        #: The device's name, the command served, the place ("BAR0 at 0x10+0x4"), what went wrong.
        self.device = device
        self.command = command
        self.where = where
        self.reason = reason
        super().__init__(f"{device}: {command} {where}: {reason}")


#: Told of every device bug (after it was logged).
Listener = Callable[[DeviceCodeError], None]


class DeviceErrors:
    """Where one device's failures go: a WARNING line, then each listener."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.listeners: list[Listener] = []

    def report(
        self, command: str, where: str, reason: str, cause: BaseException | None = None
    ) -> DeviceCodeError:
        """Log a device bug at WARNING and tell the listeners; returns it as an exception."""
        error = DeviceCodeError(self.device, command, where, reason)
        error.__cause__ = cause
        # exc_info of the device's own exception: its traceback ends in the device's code.
        log.warning("%s", error, exc_info=cause)
        for listener in list(self.listeners):
            listener(error)
        return error

    def bug(
        self, command: str, where: str, reason: str, cause: BaseException | None = None
    ) -> VfioUserError:
        """Report a device bug; returns the EIO error to answer the client with."""
        self.report(command, where, reason, cause)
        return VfioUserError(errno.EIO, f"device error in {command} {where}: {reason}")

    def dma_failed(self, command: str, where: str, error: VfioUserError) -> None:
        """Log a DMA access of the device that failed inside a callback (the client's errno)."""
        log.warning("%s: %s %s: the device's DMA failed: %s", self.device, command, where, error)
