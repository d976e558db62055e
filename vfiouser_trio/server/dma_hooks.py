"""The device's DMA map hooks: told when the client adds and removes guest memory.

libvfio-user's ``vfu_setup_device_dma`` registers two such callbacks (SPDK registers
guest memory with its own layers in them). A :class:`~vfiouser_trio.server.Device`
overrides either or both::

    async def dma_mapped(self, window: DmaWindow) -> None:
        self.windows[window.iova] = window

    async def dma_unmapped(self, window: DmaWindow) -> None:
        del self.windows[window.iova]

``dma_mapped`` runs for each new DMA_MAP (a replayed identical map is a no-op and is not
announced again), once the window is usable: the hook may DMA into it. Raising
``VfioUserError(errno)`` refuses the map with that errno; any other exception is a device
bug (EIO, logged at WARNING with its traceback, see ``server/device_errors.py``). Either
way the window is removed again, without ``dma_unmapped``, so the client's view and ours
agree: no map.

``dma_unmapped`` runs for each window the device was told of, when the client unmaps it
(DMA_UNMAP, also with the ALL flag) or goes away, before the window's memory goes: the map
is still usable while the hook runs, so the device can finish or abandon work on it and
must close its views and pins of it there. Once the hook returns no new access starts on
the window, the unmap waits for the accesses, views and pins still using it, and only
then is the memory unmapped and DMA_UNMAP answered (spec, "DMA_UNMAP":
https://www.qemu.org/docs/master/interop/vfio-user.html). The hook cannot keep the
window: the client takes its memory back whatever the device says. So an exception from
it is logged at WARNING (a device bug, with its traceback, raised into the test by
``nested_device``), the window is removed all the same and DMA_UNMAP succeeds, which
tells the client the truth: the server no longer reaches that memory.

When the client has left, its DMA_READ/DMA_WRITE path is cut before the maps go, so
in ``dma_unmapped`` only fd-backed windows can still be reached (the others fail with
EFAULT). DEVICE_RESET keeps the maps (as a VFIO reset does), so it calls neither hook. A second
unmap of a window whose unmap is under way (a DMA_UNMAP racing the client's departure)
waits for the first, and the device is told once.

Both hooks run in the task serving the client's command, so a hook waiting on the
client's own DMA (a map without fd) is fine, and DMA from a hook while the device is
stopped for migration fails at once with EBUSY (see ``server/dma.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress

from ..protocol.errors import VfioUserError
from .device_errors import DeviceErrors
from .dma import DmaError, DmaWindow

log = logging.getLogger(__name__)

Hook = Callable[[DmaWindow], Awaitable[None]]


class DmaHooks:
    """The DMA map hooks of a :class:`~vfiouser_trio.server.Device` (which inherits them)."""

    async def dma_mapped(self, window: DmaWindow) -> None:
        """The client mapped ``window`` (DMA_MAP); raise VfioUserError(errno) to refuse it."""

    async def dma_unmapped(self, window: DmaWindow) -> None:
        """``window`` is going away: let go of it (views, pins, work queued on it) now.

        The window is still usable here and removed once this returns (or raises).
        """


def _where(window: DmaWindow) -> str:
    return f"window {window.iova:#x}+{window.size:#x}"


class DmaHookRunner:
    """Calls a device's hooks for its DMA table, turning their failures into the client's errno.

    The table's ``DmaListener``: the session makes one per device.
    """

    __slots__ = ("_errors", "_hooks", "_mapped", "_unmapped")

    def __init__(self, hooks: DmaHooks, errors: DeviceErrors) -> None:
        self._hooks = hooks
        self._errors = errors
        # A device that overrides neither hook costs nothing per map.
        kind = type(hooks)
        self._mapped = kind.dma_mapped is not DmaHooks.dma_mapped
        self._unmapped = kind.dma_unmapped is not DmaHooks.dma_unmapped

    async def mapped(self, window: DmaWindow) -> None:
        if self._mapped:
            await self._call("DMA_MAP", "dma_mapped", self._hooks.dma_mapped, window)

    async def unmapped(self, window: DmaWindow) -> None:
        """Never raises (the window goes anyway): a failure is logged and reported."""
        if self._unmapped:
            with suppress(VfioUserError):
                await self._call("DMA_UNMAP", "dma_unmapped", self._hooks.dma_unmapped, window)

    async def _call(self, command: str, name: str, hook: Hook, window: DmaWindow) -> None:
        where = f"in {name}() of {_where(window)}"
        try:
            await hook(window)
        except VfioUserError as exc:
            if isinstance(exc, DmaError):
                self._errors.dma_failed(command, where, exc)
            else:  # the device's own answer to the client
                log.warning("%s: %s %s: %s", self._errors.device, command, where, exc)
            raise
        except Exception as exc:
            raise self._errors.bug(command, where, f"raised {exc!r}", exc) from exc
