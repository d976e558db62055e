"""The config region as the client reaches it: framework registers and device callbacks.

`PciConfigSpace` owns the standard header and the capabilities; the device may serve
other bytes itself (``Device.add_config_registers``, ``Device.add_vendor_capability``,
libvfio-user's config-region callback and ``VFU_CAP_FLAG_CALLBACK``). A client access is
answered from both: the framework's bytes from the config space, each device range from
its callbacks, with the offsets that range's callbacks count from. A write is judged by
the config space first (EINVAL, EPERM: nothing changed), then handed to the callbacks;
a write touching a range without a write callback fails with EPERM before anything
changes. Callbacks fail as region callbacks do (``server/device_errors.py``): a raise or a
read of the wrong length is EIO to the client and a WARNING naming device and offset.

The values behind those bytes are the device's own state: the framework neither resets
them (``reset()`` does) nor migrates them (``save_state`` does); in the saved config image
they read as zero.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable
from typing import TypeVar

from ..protocol.constants import PciRegion
from ..protocol.errors import VfioUserError
from .device_errors import DeviceErrors
from .dma import DmaError
from .pci import PciConfigSpace, ServedRange
from .regions import ReadHandler, Region, WriteHandler


def _shifted_read(served: ServedRange) -> ReadHandler:
    read, base = served.read, served.base

    def shifted(offset: int, count: int) -> Awaitable[bytes] | bytes:
        return read(offset - base, count)

    return shifted


def _shifted_write(served: ServedRange) -> WriteHandler | None:
    write, base = served.write, served.base
    if write is None:
        return None

    def shifted(offset: int, data: bytes) -> Awaitable[None] | None:
        return write(offset - base, data)

    return shifted


class ConfigAccess:
    """Serves REGION_READ/WRITE on the config region of ``config``'s device."""

    def __init__(self, config: PciConfigSpace, errors: DeviceErrors) -> None:
        self._config = config
        # One Region per device range: its callback calling, awaiting, length check and
        # error reports are the ones every region has (offsets in messages: config space's).
        self._ranges = [
            (
                served,
                Region(
                    PciRegion.CONFIG,
                    config.size,
                    read=_shifted_read(served),
                    write=_shifted_write(served),
                    errors=errors,
                ),
            )
            for served in config.served
        ]

    def _touched(self, offset: int, size: int) -> list[tuple[ServedRange, Region, int, int]]:
        end = offset + size
        return [
            (served, region, max(offset, served.start), min(end, served.end))
            for served, region in self._ranges
            if served.start < end and offset < served.end
        ]

    async def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``: EINVAL outside the space."""
        data = self._config.read(offset, size)
        touched = self._touched(offset, size) if self._ranges else None
        if not touched:
            return data
        out = bytearray(data)
        for _, region, start, end in touched:
            out[start - offset : end - offset] = await _served(region.do_read(start, end - start))
        return bytes(out)

    async def write(self, offset: int, data: bytes) -> None:
        """Apply a client write (errors: see the module doc)."""
        touched = self._touched(offset, len(data))
        for served, _, _, _ in touched:
            if served.write is None:
                raise VfioUserError(
                    errno.EPERM,
                    f"config write {offset:#x}+{len(data):#x}: {served.name} is read-only",
                )
        self._config.write(offset, data)
        for _, region, start, end in touched:
            await _served(region.do_write(start, data[start - offset : end - offset]))


T = TypeVar("T")


async def _served(access: Awaitable[T]) -> T:
    """Await a range's access; a failed DMA is the client's errno, already logged once."""
    try:
        return await access
    except DmaError as exc:
        # Region logged it; as a plain VfioUserError the config region does not log it again.
        raise VfioUserError(exc.errno, exc.message) from exc
