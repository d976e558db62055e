"""Live migration: the device's API, and the server's side of the migration commands.

A device opts in and describes its state; the simple case is two methods::

    class Counter(Device):
        def __init__(self) -> None:
            super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x0001))
            self.count = 0
            self.enable_migration()          # pre_copy=True adds the PRE_COPY state

        async def save_state(self) -> bytes:
            return self.count.to_bytes(8, "little")

        async def load_state(self, data: bytes) -> None:
            self.count = int.from_bytes(data, "little")

Large state goes as a stream: ``save_chunks`` is an async generator whose chunks the
client reads (MIG_DATA_READ) in STOP_COPY, and ``load_chunk`` receives what the client
writes (MIG_DATA_WRITE) in RESUMING, in pieces of the client's choosing (chunk
boundaries are not kept); ``on_end_resume`` then completes the load. By default
``save_chunks`` yields ``save_state()``, ``load_chunk`` collects, and ``on_end_resume``
passes what was collected to ``load_state`` — a device that overrides ``load_chunk``
overrides ``on_end_resume`` too. A PRE_COPY device also yields from ``precopy_chunks``
while it still runs: there an empty chunk means "nothing more for now" (the client's read
comes back short and it may read again later); in STOP_COPY empty chunks are skipped and
only the end of ``save_chunks`` ends the stream.

The arcs of the state machine call these hooks (all optional, no-ops by default):

==========================================  ==========================================
arc                                         hook, then what the framework does
==========================================  ==========================================
RUNNING -> STOP, PRE_COPY -> STOP_COPY      ``on_stop`` — finish in-flight work (DMA
                                            still works here); then IRQs are held and
                                            device DMA is held (see ``dma.py``)
STOP -> RUNNING                             IRQs and DMA released; then ``on_run``
RUNNING -> PRE_COPY, STOP -> STOP_COPY      ``on_begin_save``; a new outgoing stream
PRE_COPY -> RUNNING, STOP_COPY -> STOP      ``on_end_save``; the stream is closed
STOP -> RESUMING                            incoming data cleared; ``on_begin_resume``
RESUMING -> STOP                            the framework's state is restored (below);
                                            ``on_end_resume`` (default: ``load_state``);
                                            then the config-space hooks fire once
==========================================  ==========================================

During a hook ``self.migration.state`` is still the arc's start state (``on_begin_save``
from RUNNING begins a pre-copy, from STOP a stop-copy). A hook that raises
:class:`MigrationRefused` fails the SET with the device left in the arc's start state (it
promises it undid what it did); any other exception fails the SET and puts the device in
ERROR (held like STOP), from which only DEVICE_RESET returns it, to RUNNING — the device's
``reset()`` runs, not ``on_run``. While stopped (STOP, STOP_COPY, RESUMING, ERROR) the
device raises no interrupts and performs no DMA; the server also refuses the commands
the spec forbids in STOP and STOP_COPY (``command_allowed``). A client that disconnects
mid-migration does not leave the device stopped for the next one: the device returns to
RUNNING (:meth:`DeviceMigration.client_gone` says how, state by state).

:class:`SessionMigration` is the session's side: DEVICE_FEATURE (MIGRATION,
MIG_DEVICE_STATE, DMA_LOGGING_START/STOP/REPORT), MIG_DATA_READ/WRITE and the command
gate. A device that did not opt in answers every feature with EINVAL.

What travels: the device's stream is wrapped (``migration_stream.py`` has the exact
layout) so that the framework's state goes with it. The stream is a 24-byte header
(magic ``b"VUTM"``, version 1, header size, the device's identity: vendor, device,
subsystem IDs, class code and revision), then records (type u32, length u32, payload):
DATA records carry the device's chunks (pre-copy and stop-copy alike), one FRAMEWORK
record the config space image, MSI-X table and PBA and every IRQ vector's masked /
pending bits (not eventfds: the destination's client assigns its own), and an END
record the byte count and CRC-32 of everything before it. The framework's part is
taken when the device's stop-copy stream ends.

The destination checks the stream as it arrives. Data that is wrong (magic, version,
another device's identity, a config layout or IRQ set that is not ours, records out of
order, a checksum that does not match, bytes after END) fails the MIG_DATA_WRITE that
carries it with EINVAL, and then the SET that leaves RESUMING with EINVAL; a stream
that stops before END fails that SET with EIO. Either way the device is in ERROR.
Leaving RESUMING, the framework restores its part without running config-write side
effects (MSI/MSI-X state is re-derived from the image, nothing is delivered), lets the
device load its own state, then fires each config-space hook once (``command_changed``,
``bar_changed`` per BAR, ``msi_changed``, ``msix_changed``) so the device sees the
restored command, BARs and interrupt setup. Interrupts pending on the source stay
pending and go out once the destination runs, the vector is unmasked and the client
has assigned an eventfd.

Raw streams: ``enable_migration(raw=True)`` hands the device every byte of the stream,
for a device that must migrate to or from another implementation of itself (e.g. a C
server built on libvfio-user). Its ``precopy_chunks`` and ``save_chunks`` are sent as
they are, back to back (the spec's stream is continuous from PRE_COPY into STOP_COPY:
bytes of a pre-copy chunk the client has not read yet go first in STOP_COPY), and what
the client writes reaches ``load_chunk`` unchanged. The framework then carries nothing
of its own: no header or identity check, no config space image, MSI-X table or PBA, no
IRQ masked / pending bits, no length or CRC-32 and no completeness check (a stream cut
short is only detected if the device's format shows it), and no config-space hooks fire
after the load. A raw device that needs any of this puts it in its own format (and
restores it in ``on_end_resume``); the destination's client sets up the config space
and interrupts as it would for a fresh device. Some clients read the PRE_COPY data and
drop it, sending only what STOP_COPY yields (libvfio-user's ``samples/client`` does):
a raw device serves them, and clients that forward everything, if every part of its
stream is a full snapshot and ``on_end_resume`` keeps the last (or if ``save_chunks``
yields the whole state and the pre-copy part is something the destination may ignore).
A framework-mode stream cannot be cut that way: its destination refuses the first
write of such a client (EINVAL, "the stream does not begin with its header").
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final, Never

import trio

from ..limits import DEFAULT_LIMITS, ServerLimits
from ..protocol.constants import (
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_SET,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    Command,
    Feature,
    MigState,
)
from ..protocol.errors import VfioUserError
from ..protocol.features import (
    FEATURE_HEADER_SIZE,
    DeviceFeatureReply,
    DeviceFeatureRequest,
    DmaLoggingBitmap,
    DmaLoggingControl,
    DmaLoggingReport,
    MigDeviceState,
    MigrationInfo,
)
from ..protocol.migration_data import (
    MigDataReadReply,
    MigDataReadRequest,
    MigDataWriteReply,
    MigDataWriteRequest,
)
from ..protocol.migration_fsm import (
    SAVING_STATES,
    Arc,
    MigrationFsm,
    command_allowed,
    require_command_allowed,
)
from ..protocol.region_io import check_xfer_size
from .device_runtime import assignment_refused
from .dirty import DirtyLog, select_page_size
from .migration_stream import FrameworkState, StreamDecoder, StreamEncoder

if TYPE_CHECKING:
    from .device_runtime import DeviceRuntime

__all__ = ["DeviceMigration", "MigrationHooks", "MigrationRefused", "SessionMigration"]

#: The commands a RUNNING device refuses (``command_allowed``'s rule, read once: the
#: migration data's, there being none to move): the session calls check_command only for
#: these while the device runs, since it takes every other one.
RUNNING_REFUSES = frozenset(
    int(command) for command in Command if not command_allowed(MigState.RUNNING, command)
)
# A module constant: an enum member looked up on its class costs ~100 ns on Python 3.11,
# and this is compared once per command.
RUNNING: Final = MigState.RUNNING

log = logging.getLogger(__name__)

_S = MigState
_STOPPING_ARCS = frozenset({Arc(_S.RUNNING, _S.STOP), Arc(_S.PRE_COPY, _S.STOP_COPY)})
_BEGIN_SAVE_ARCS = frozenset({Arc(_S.RUNNING, _S.PRE_COPY), Arc(_S.STOP, _S.STOP_COPY)})
_END_SAVE_ARCS = frozenset({Arc(_S.PRE_COPY, _S.RUNNING), Arc(_S.STOP_COPY, _S.STOP)})
_RUNNING_STATES = frozenset({_S.RUNNING, _S.PRE_COPY})


class MigrationRefused(VfioUserError):
    """Raised by a migration hook: the arc fails, the device stays in the arc's start state."""

    def __init__(self, message: str = "", *, errno: int = errno.EINVAL) -> None:
        super().__init__(errno, message, command=Command.DEVICE_FEATURE)


class MigrationHooks:
    """Migration support of a :class:`Device` (which inherits it). See the module docstring."""

    # Provided by Device.
    _vfu: DeviceRuntime
    if TYPE_CHECKING:

        @property
        def name(self) -> str: ...

    @property
    def migration(self) -> DeviceMigration | None:
        """The migration state (``.state``), set by ``enable_migration``; else None."""
        return self._vfu.migration

    @migration.setter
    def migration(self, value: Never) -> None:
        raise assignment_refused(self, "migration")

    def enable_migration(self, *, pre_copy: bool = False, raw: bool = False) -> None:
        """Declare that the device can migrate (STOP_COPY; PRE_COPY too with ``pre_copy``).

        ``raw``: the device's chunks are the whole stream, with nothing of the framework's
        around them (see "Raw streams" in the module docstring).
        """
        self._vfu.declaring()
        self._vfu.migration = DeviceMigration(self, pre_copy=pre_copy, raw=raw)

    # --- the state ----------------------------------------------------------------------

    async def save_state(self) -> bytes:
        """The device's whole state (simple case; used by the default ``save_chunks``)."""
        raise NotImplementedError(f"{self.name} does not implement save_state")

    async def load_state(self, data: bytes) -> None:
        """Restore a state saved by ``save_state`` (default ``on_end_resume``).

        Raise (e.g. ValueError) for invalid data: the SET to leave RESUMING fails.
        """
        raise NotImplementedError(f"{self.name} does not implement load_state")

    async def save_chunks(self) -> AsyncIterator[bytes]:
        """The state as a stream of chunks, read in STOP_COPY (default: ``save_state()``)."""
        yield await self.save_state()

    async def precopy_chunks(self) -> AsyncIterator[bytes]:
        """Data the client may read ahead in PRE_COPY; ``b""`` means "nothing for now"."""
        return
        yield b""  # pragma: no cover  (an empty async generator)

    async def load_chunk(self, data: bytes) -> None:
        """The next piece of the incoming stream (RESUMING). Default: collect it."""
        assert self.migration is not None
        self.migration.received.extend(data)

    # --- arc hooks ------------------------------------------------------------------------

    async def on_stop(self) -> None:
        """The device is about to stop: finish in-flight work (DMA and IRQs still work)."""

    async def on_run(self) -> None:
        """The device runs again (DMA and IRQs are released)."""

    async def on_begin_save(self) -> None:
        """An outgoing stream begins (pre-copy from RUNNING, stop-copy from STOP)."""

    async def on_end_save(self) -> None:
        """The outgoing stream ended (read out, or abandoned by the client)."""

    async def on_begin_resume(self) -> None:
        """An incoming stream begins: prepare to receive a state."""

    async def on_end_resume(self) -> None:
        """The incoming stream is complete. Default: ``load_state(everything collected)``."""
        assert self.migration is not None
        data = bytes(self.migration.received)
        self.migration.received.clear()
        await self.load_state(data)


class DeviceMigration:
    """One device's migration state: the FSM, its arcs, and the data streams.

    Kept with the device, so the state survives a client's disconnection like the rest
    of the device's state. Operations are serialised (one SET, read or write at a time).
    """

    def __init__(
        self, device: MigrationHooks, *, pre_copy: bool = False, raw: bool = False
    ) -> None:
        flags = MIGRATION_STOP_COPY | (MIGRATION_PRE_COPY if pre_copy else 0)
        self.fsm = MigrationFsm(flags)
        self.state = MigState.RUNNING
        #: Whether the device's chunks are the whole stream (no framework container).
        self.raw = raw
        #: Incoming data collected by the default ``load_chunk``.
        self.received = bytearray()
        self._device = device
        #: The framework's side of the device (config space, IRQs, DMA, reset).
        self._vfu = device._vfu
        self._lock = trio.Lock()
        self._source: AsyncIterator[bytes] | None = None
        self._pending = memoryview(b"")
        self._exhausted = False
        self._broken: VfioUserError | None = None
        self._encoder = StreamEncoder(device._vfu.identity)
        self._decoder: StreamDecoder | None = None

    @property
    def flags(self) -> int:
        """VFIO_DEVICE_FEATURE_MIGRATION flags (STOP_COPY, PRE_COPY)."""
        return self.fsm.flags

    @property
    def running(self) -> bool:
        """Whether the device runs (RUNNING or PRE_COPY): DMA and IRQs flow."""
        return self.state in _RUNNING_STATES

    # --- state changes --------------------------------------------------------------------

    async def set_state(self, target: int) -> MigState:
        """Carry out a MIG_DEVICE_STATE SET: every arc of the path, in order.

        EINVAL for a refused transition (before any arc runs). A failing arc raises its
        error (EIO for an exception that is not a VfioUserError) and leaves the device in
        the arc's start state (MigrationRefused) or in ERROR.
        """
        async with self._lock:
            transition = self.fsm.transition(self.state, target)
            while (arc := transition.next_arc) is not None:
                try:
                    await self._run_arc(arc)
                except MigrationRefused:
                    self.state = transition.arc_failed(restored=True)
                    raise
                except BaseException as exc:
                    self.state = transition.arc_failed(restored=False)
                    self._enter_error()
                    if isinstance(exc, Exception) and not isinstance(exc, VfioUserError):
                        where = f"in the {arc.src.name} -> {arc.dst.name} hook"
                        raise self._vfu.errors.bug(
                            "MIG_DEVICE_STATE", where, f"raised {exc!r}", exc
                        ) from exc
                    raise
                self.state = transition.arc_done()
            return self.state

    async def _run_arc(self, arc: Arc) -> None:
        device = self._device
        if arc in _STOPPING_ARCS:
            await device.on_stop()
            self._halt()
            if arc.src == MigState.PRE_COPY:
                # The pre-copy source is done; bytes already taken from it stay queued.
                await self._close_source()
                self._exhausted = False
        elif arc == Arc(MigState.STOP, MigState.RUNNING):
            self._release()
            try:
                await device.on_run()
            except MigrationRefused:
                self._halt()
                raise
        elif arc in _BEGIN_SAVE_ARCS:
            await device.on_begin_save()
            await self._reset_stream()
        elif arc in _END_SAVE_ARCS:
            await device.on_end_save()
            await self._reset_stream()
        elif arc == Arc(MigState.STOP, MigState.RESUMING):
            self.received.clear()
            self._decoder = self._new_decoder()
            await device.on_begin_resume()
        elif arc == Arc(MigState.RESUMING, MigState.STOP):
            await self._end_resume()
        else:  # pragma: no cover - the FSM only yields the arcs above
            raise AssertionError(f"unexpected arc {arc}")

    async def _end_resume(self) -> None:
        """RESUMING -> STOP: framework state, then the device's, then the config hooks."""
        device = self._device
        if self.raw:
            await device.on_end_resume()
            self.received.clear()
            return
        decoder, self._decoder = self._decoder, None
        framework = (decoder or self._new_decoder()).finish()
        vfu = self._vfu
        try:
            previous_command = framework.restore(vfu.config(), vfu.irqs())
        except ValueError as exc:  # checked on arrival: only if the device changed since
            raise VfioUserError(errno.EINVAL, f"invalid migration data: {exc}") from exc
        vfu.msix_table_driven = framework.msix_table_driven
        await device.on_end_resume()
        self.received.clear()
        vfu.config().announce_restored(previous_command)

    def _new_decoder(self) -> StreamDecoder:
        vfu = self._vfu
        return StreamDecoder(vfu.identity, vfu.config(), vfu.irqs())

    def _capture(self) -> FrameworkState:
        vfu = self._vfu
        return FrameworkState.capture(
            vfu.config(), vfu.irqs(), msix_table_driven=vfu.msix_table_driven
        )

    async def reset(self) -> None:
        """DEVICE_RESET: back to RUNNING from any state, streams dropped, IRQs and DMA released."""
        async with self._lock:
            await self._reset_stream()
            self.received.clear()
            self._decoder = None
            self.state = MigrationFsm.after_reset()
            self._release()

    def _halt(self) -> None:
        self._vfu.quiesce(True)
        self._vfu.dma.stop()

    def _release(self) -> None:
        self._vfu.dma.resume()
        self._vfu.quiesce(False)

    def _enter_error(self) -> None:
        self._halt()
        # No await here (this may run while cancelled): trio finalizes the generator.
        self._source = None
        self._pending = memoryview(b"")

    async def _close_source(self) -> None:
        source, self._source = self._source, None
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.exception("%s: closing a migration stream failed", self._device.name)

    async def _reset_stream(self) -> None:
        await self._close_source()
        self._pending = memoryview(b"")
        self._exhausted = False
        self._broken = None
        self._encoder = StreamEncoder(self._vfu.identity)

    async def client_gone(self) -> None:
        """The client left: a device it left stopped (or saving) runs again.

        A VMM that dies mid-migration must not leave the device unusable for the next
        client, so whatever the state, the device ends in RUNNING with the rest of its
        state kept (spec: Client Disconnection), each case logged as a warning:

        - PRE_COPY, STOP_COPY, STOP take their arcs to RUNNING (``on_end_save``,
          ``on_run``); the outgoing stream is dropped, interrupts and DMA are released.
        - RESUMING: the partial incoming stream is discarded and nothing of it is
          loaded (no ``on_end_resume``); the device goes STOP -> RUNNING with the state
          it had before. A device whose own ``load_chunk`` applies data as it arrives
          must itself undo that in ``on_run``.
        - ERROR, or an arc that fails or is refused on the way: the device is reset as
          by DEVICE_RESET (its ``reset()``), since no valid state is left to keep.
        """
        device = self._device
        start = self.state
        if start == MigState.RUNNING:
            return
        log.warning(
            "%s: the client left while the device was in %s; returning it to RUNNING",
            device.name,
            start.name,
        )
        if start == MigState.RESUMING:
            async with self._lock:
                self._decoder = None
                self.received.clear()
                self.state = MigState.STOP
            log.warning("%s: the partial incoming migration state is discarded", device.name)
        if self.state != MigState.ERROR:
            try:
                await self.set_state(MigState.RUNNING)
            except Exception as exc:
                log.warning("%s: returning to RUNNING failed: %s", device.name, exc)
        if self.state != MigState.RUNNING:
            log.warning("%s: resetting the device (left in %s)", device.name, self.state.name)
            try:
                await self._vfu.do_reset()
            except Exception:
                log.exception("%s: reset after the client left failed", device.name)
            await self.reset()

    # --- the data streams -------------------------------------------------------------

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the outgoing stream (PRE_COPY / STOP_COPY, else EINVAL).

        Fewer bytes mean the stream has nothing more (for now, in PRE_COPY). An exception
        from the device's generator breaks the stream: this and every later read of it
        fail (EIO unless the device raised a VfioUserError).
        """
        async with self._lock:
            if self.state not in SAVING_STATES:
                raise VfioUserError(errno.EINVAL, f"no migration data to read in {self.state.name}")
            # Slices of the pending chunks, joined once: each byte is copied a single time.
            parts: list[memoryview] = []
            want = size
            while want:
                if not self._pending:
                    chunk = await self._pull()
                    if not chunk:
                        break
                    self._pending = memoryview(chunk)
                n = min(want, len(self._pending))
                parts.append(self._pending[:n])
                self._pending = self._pending[n:]
                want -= n
            return b"".join(parts)

    async def _pull(self) -> bytes:
        """The next non-empty piece of the stream; b"" at the end (or, in PRE_COPY, for
        "nothing now"). The device's chunks go out as DATA records after the stream's
        header; the end of its stop-copy chunks adds the framework's state and END."""
        if self._broken is not None:
            raise VfioUserError(self._broken.errno, self._broken.message)
        if not self.raw and not self._encoder.started:
            return self._encoder.header()
        while not self._exhausted:
            if self._source is None:
                device = self._device
                stream = (
                    device.precopy_chunks()
                    if self.state == MigState.PRE_COPY
                    else device.save_chunks()
                )
                self._source = aiter(stream)
            try:
                chunk = bytes(await anext(self._source))
            except StopAsyncIteration:
                self._source = None
                self._exhausted = True
                if self.state == MigState.STOP_COPY and not self.raw:
                    return self._encoder.finish(self._capture())
                break
            except Exception as exc:
                self._source = None
                if isinstance(exc, VfioUserError):
                    self._broken = exc
                else:
                    hook = "precopy_chunks" if self.state == MigState.PRE_COPY else "save_chunks"
                    where = f"in {hook}()"
                    self._broken = self._vfu.errors.bug(
                        "MIG_DATA_READ", where, f"raised {exc!r}", exc
                    )
                raise VfioUserError(self._broken.errno, self._broken.message) from exc
            if chunk:
                return chunk if self.raw else self._encoder.data(chunk)
            if self.state == MigState.PRE_COPY:
                return b""
        return b""

    async def write(self, data: bytes) -> None:
        """Take the next piece of the incoming stream (RESUMING, else EINVAL).

        The stream is checked as it arrives (EINVAL for invalid data, see the module
        docstring); the device's own bytes go to its ``load_chunk``.
        """
        async with self._lock:
            if self.state != MigState.RESUMING:
                raise VfioUserError(
                    errno.EINVAL, f"migration data cannot be written in {self.state.name}"
                )
            if self.raw:
                pieces = [data] if data else []
            else:
                if self._decoder is None:
                    self._decoder = self._new_decoder()
                try:
                    pieces = self._decoder.feed(data)
                except VfioUserError as exc:
                    # The client sees only the errno: say here what was wrong.
                    log.warning("%s: migration data refused: %s", self._device.name, exc.message)
                    raise
            try:
                for piece in pieces:
                    await self._device.load_chunk(piece)
            except VfioUserError:
                raise
            except Exception as exc:
                raise self._vfu.errors.bug(
                    "MIG_DATA_WRITE", "in load_chunk()", f"raised {exc!r}", exc
                ) from exc


#: The operations each feature supports (a PROBE succeeds only for these).
_FEATURE_OPS: dict[int, int] = {
    Feature.MIGRATION: DEVICE_FEATURE_GET,
    Feature.MIG_DEVICE_STATE: DEVICE_FEATURE_GET | DEVICE_FEATURE_SET,
    Feature.DMA_LOGGING_START: DEVICE_FEATURE_SET,
    Feature.DMA_LOGGING_STOP: DEVICE_FEATURE_SET,
    Feature.DMA_LOGGING_REPORT: DEVICE_FEATURE_GET,
}
_OPS = DEVICE_FEATURE_GET | DEVICE_FEATURE_SET


class SessionMigration:
    """A session's migration commands for ``device``; owns the session's dirty-page log.

    ``limits`` bounds that log (``max_dirty_bitmap_bytes``, ``max_dirty_ranges``; see
    ``dirty.py``).
    """

    def __init__(self, device: MigrationHooks, limits: ServerLimits = DEFAULT_LIMITS) -> None:
        self.device = device
        self.limits = limits
        #: The DMA write log while DMA_LOGGING_START is in effect.
        self.dirty: DirtyLog | None = None

    def check_command(self, command: int) -> None:
        """EINVAL for a command the device's migration state does not accept.

        (The session skips the call in the common case, a running device and a command it
        takes: see ``RUNNING`` and ``RUNNING_REFUSES``.)
        """
        migration = self.device._vfu.migration  # (Device.migration, without the property call)
        if migration is None:
            return
        try:
            known = Command(command)
        except ValueError:
            return  # unknown commands are refused by the decoder
        require_command_allowed(migration.state, known)

    def _migration(self) -> DeviceMigration:
        migration = self.device.migration
        if migration is None:
            raise VfioUserError(errno.EINVAL, f"{self.device.name} does not support migration")
        return migration

    # --- DEVICE_FEATURE -------------------------------------------------------------------

    async def feature(self, request: DeviceFeatureRequest, max_data: int) -> DeviceFeatureReply:
        """Answer DEVICE_FEATURE; ``max_data`` bounds a REPORT's bitmap (our transfer limit)."""
        migration = self._migration()
        supported = _FEATURE_OPS.get(request.feature, 0)
        if request.flags & _OPS & ~supported or not supported:
            raise VfioUserError(errno.EINVAL, f"feature {request.feature} does not do that")
        if request.is_probe:
            return request.echo_reply()
        match request.feature:
            case Feature.MIGRATION:
                return self._get(request, MigrationInfo(migration.flags))
            case Feature.MIG_DEVICE_STATE if request.is_get:
                return self._get(request, MigDeviceState(migration.state, -1))
            case Feature.MIG_DEVICE_STATE:
                data = request.data
                assert isinstance(data, MigDeviceState)
                await migration.set_state(data.device_state)
                return request.echo_reply()
            case Feature.DMA_LOGGING_START:
                assert isinstance(request.data, DmaLoggingControl)
                return self._start_logging(request, request.data)
            case Feature.DMA_LOGGING_STOP:
                self.close()
                return request.echo_reply()
            case _:
                assert isinstance(request.data, DmaLoggingReport)
                return self._report(request, request.data, max_data)

    @staticmethod
    def _get(
        request: DeviceFeatureRequest, data: MigrationInfo | MigDeviceState
    ) -> DeviceFeatureReply:
        reply = request.get_reply(data)
        assert reply.argsz is not None
        _check_room(request, reply.argsz)
        return reply

    def _start_logging(
        self, request: DeviceFeatureRequest, control: DmaLoggingControl
    ) -> DeviceFeatureReply:
        page_size = select_page_size(control.page_size)
        ranges = [(r.iova, r.length) for r in control.ranges]
        if self.dirty is None:
            self.dirty = DirtyLog(
                self.device._vfu.dma,
                page_size,
                ranges,
                max_bitmap_bytes=self.limits.max_dirty_bitmap_bytes,
                max_ranges=self.limits.max_dirty_ranges,
                name=self.device.name,
            )
        elif self.dirty.page_size == page_size:
            # Restarting with the same granularity keeps the bits; the new ranges apply.
            self.dirty.set_ranges(ranges)
        else:
            raise VfioUserError(
                errno.EINVAL, f"logging already runs at page size {self.dirty.page_size:#x}"
            )
        echoed = DmaLoggingControl(page_size, control.ranges)
        return DeviceFeatureReply(request.flags, echoed, request.argsz)

    def _report(
        self, request: DeviceFeatureRequest, report: DmaLoggingReport, max_data: int
    ) -> DeviceFeatureReply:
        if self.dirty is None:
            raise VfioUserError(errno.EINVAL, "DMA logging is not started")
        if report.page_size == 0:
            raise VfioUserError(errno.EINVAL, "report page size 0")
        if report.bitmap_size > max_data:
            raise VfioUserError(
                errno.EINVAL, f"a {report.bitmap_size}-byte bitmap exceeds {max_data} bytes"
            )
        # Check the room before taking (and clearing) the bits.
        _check_room(request, FEATURE_HEADER_SIZE + 24 + report.bitmap_size)
        bitmap = self.dirty.report(report.iova, report.length, report.page_size)
        data = DmaLoggingBitmap(report.iova, report.length, report.page_size, bitmap)
        return request.get_reply(data)

    # --- MIG_DATA_READ / MIG_DATA_WRITE ---------------------------------------------------

    async def data_read(self, request: MigDataReadRequest, max_size: int) -> MigDataReadReply:
        """MIG_DATA_READ: 8 + ``size`` bytes of payload, ``size`` field = valid bytes."""
        migration = self._migration()
        check_xfer_size(request, max_size)
        return request.reply(await migration.read(request.size))

    async def data_write(self, request: MigDataWriteRequest, max_size: int) -> MigDataWriteReply:
        """MIG_DATA_WRITE: the data goes to the device's ``load_chunk``; empty reply."""
        migration = self._migration()
        check_xfer_size(request, max_size)
        await migration.write(request.data)
        return MigDataWriteReply()

    # --- session events -------------------------------------------------------------------

    async def device_reset(self) -> None:
        """After DEVICE_RESET: the migration state returns to RUNNING."""
        if self.device.migration is not None:
            await self.device.migration.reset()

    def close(self) -> None:
        """Stop dirty logging (DMA_LOGGING_STOP, or the client went away)."""
        if self.dirty is not None:
            self.dirty.close()
            self.dirty = None


def _check_room(request: DeviceFeatureRequest, needed: int) -> None:
    assert request.argsz is not None
    if request.argsz < needed:
        raise VfioUserError(
            errno.EINVAL, f"argsz {request.argsz} cannot hold the {needed}-byte reply"
        )
