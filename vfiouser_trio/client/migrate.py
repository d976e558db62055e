"""Live migration of a device from one vfio-user server to another, driven by their client.

    async with connect(source_path) as source, connect(destination_path) as destination:
        summary = await migrate(source, destination, progress=print)

What :func:`migrate` does, each step named by a :class:`MigrationStep`:

1. ``check``: both devices support migration (MIGRATION feature, STOP_COPY), the source is
   RUNNING, the destination RUNNING or STOP; PRE_COPY is used when the source offers it
   (``pre_copy=None``), or as asked.
2. ``dirty-start``: dirty-page logging of the source's DMA maps starts, when the source has
   maps and supports logging (``track_dirty=None``), or as asked. Logging the caller
   started before is used as it is (and left running).
3. ``resuming``: the destination goes to RESUMING.
4. ``pre-copy``: the source goes to PRE_COPY and its data streams to the destination
   (``read`` from the source, ``write`` to the destination) until the source has nothing
   more for now (or ``pre_copy_limit`` bytes moved).
5. ``stop-copy``: the source stops (STOP_COPY) and the rest of its stream is moved.
6. ``source-stop``: the source goes to STOP. ``dirty-report``: the pages the device wrote
   in the logged ranges are fetched (the device is stopped: the report is final), one
   report per DMA map that a logged range covers, each from the map's start when the range
   starts there (logging over every write, no ranges, reports every map); pages this client
   wrote itself serving DMA_WRITE are included (see ``Client.dirty_pages``).
7. ``switchover``: the caller's ``on_switchover(dirty)`` runs, with the source stopped and
   the destination still RESUMING with all the data written, e.g. to copy the dirty guest
   pages to the destination's memory (or to map it: RESUMING accepts DMA_MAP, STOP does
   not). ``load``: the destination goes to STOP, which loads the state (a device that
   rejects the data fails here, or already at a ``write``).
8. ``run``: the destination goes to RUNNING: the switch-over. Logging this call started
   is then stopped (a failure there is only a warning in the summary).

Chunks are read at the source's ``max_data_xfer_size`` and written at the destination's,
each the smaller of that server's limit and this client's own (libvfio-user refuses
transfers above the client's); reading and writing overlap. Data streams carry no
length: ``progress`` gets the phase and the bytes moved so far, never a total.

On success the source is left in STOP (it still holds the state; SET RUNNING takes the
device back there if the destination is abandoned) and the destination RUNNING. The source
stays stopped only while this client stays connected to it: a server returns a device to
RUNNING when its client goes (with the client's DMA maps and interrupt fds gone, so it can
reach no guest), as a device must never be left stopped for its next client.

On failure :class:`MigrationError` says which step failed on which side, with the server's
error, and the devices are left as follows (``source_state`` / ``destination_state`` in the
error tell what they are then; None when a device cannot be reached):

- Before the switch-over the source goes back to RUNNING (SET RUNNING from PRE_COPY,
  STOP_COPY or STOP) with the state it had. A source whose own failure put it in ERROR stays
  there: only DEVICE_RESET leaves ERROR, and that would discard the guest's device state,
  which is the caller's decision.
- The destination, if this call had changed its state, is reset (DEVICE_RESET; from STOP
  after a SET RESUMING, as STOP refuses DEVICE_RESET): it ends RUNNING with its reset
  state (config space included: set it up again before another attempt) and holds nothing
  of the source's. It never runs the migrated state. A server that keeps the migration
  state across DEVICE_RESET (libvfio-user does) is then told SET RUNNING and the device
  reset again (between the two it may run, for that moment, what it had loaded). A
  device that cannot be reset stays where it is (RESUMING or ERROR: stopped), with the
  refusal in ``cleanup_errors``; an unreachable one is left as it is.
- Exception: when the destination could not be asked for its state after being told to
  run (its connection died during the last step), it may be running, so the source is left
  in STOP (for as long as the caller's connection lasts) rather than risk two running copies.
- Dirty-page logging this call started is stopped.

Cancelling the call (e.g. ``trio.fail_after``) cleans up the same way (within
:data:`CLEANUP_TIMEOUT` seconds) before the cancellation goes on.
"""

from __future__ import annotations

import enum
import errno
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import trio

from ..engine import ConnectionClosedError
from ..protocol.constants import Feature, MigState
from ..protocol.errors import VfioUserError
from .client import Client
from .dirty import DirtyPages
from .dma import DmaMap

__all__ = [
    "CLEANUP_TIMEOUT",
    "MigrationError",
    "MigrationProgress",
    "MigrationStep",
    "MigrationSummary",
    "Phase",
    "PhaseStats",
    "Side",
    "migrate",
]

T = TypeVar("T")

#: Which device a step concerns.
Side = Literal["source", "destination"]

#: Seconds the clean-up after a failure (or a cancellation) may take.
CLEANUP_TIMEOUT = 30.0
#: Chunks read ahead of the writer.
_PIPELINE_DEPTH = 2


class Phase(enum.StrEnum):
    """Where a migration is, for progress reports and the summary."""

    PRE_COPY = "pre-copy"
    STOP_COPY = "stop-copy"
    #: Loading the state on the destination, the switch-over callback, then running it.
    RESUME = "resume"
    DONE = "done"


class MigrationStep(enum.StrEnum):
    """The steps of :func:`migrate` (see the module docstring)."""

    CHECK = "check"
    DIRTY_START = "dirty-start"
    RESUMING = "resuming"
    PRE_COPY = "pre-copy"
    READ = "read"
    WRITE = "write"
    STOP_COPY = "stop-copy"
    SOURCE_STOP = "source-stop"
    DIRTY_REPORT = "dirty-report"
    LOAD = "load"
    SWITCHOVER = "switchover"
    RUN = "run"


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """A progress report: the phase, and the bytes moved in it and in all."""

    phase: Phase
    phase_bytes: int
    total_bytes: int
    #: Seconds since the migration started.
    elapsed: float


@dataclass(frozen=True, slots=True)
class PhaseStats:
    """Bytes moved and seconds spent in one phase."""

    bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class MigrationSummary:
    """What a successful :func:`migrate` did."""

    #: Bytes of device state moved from the source to the destination.
    bytes: int
    #: Seconds, from the first check to the destination running.
    seconds: float
    #: Seconds the device ran nowhere: from the source's STOP_COPY to the destination's RUNNING.
    downtime: float
    phases: dict[Phase, PhaseStats]
    #: Whether PRE_COPY was used.
    pre_copy: bool
    #: Pages the device wrote in the source's logged ranges (None when nothing was logged).
    dirty: tuple[DirtyPages, ...] | None
    #: Problems after the switch-over that did not fail the migration.
    warnings: tuple[str, ...] = ()

    @property
    def stream_seconds(self) -> float:
        """Seconds spent moving data (pre-copy and stop-copy)."""
        return sum(
            stats.seconds
            for phase, stats in self.phases.items()
            if phase in (Phase.PRE_COPY, Phase.STOP_COPY)
        )

    @property
    def throughput(self) -> float:
        """Bytes per second while data moved."""
        seconds = self.stream_seconds
        return self.bytes / seconds if seconds > 0 else 0.0


class MigrationError(VfioUserError):
    """A migration failed at ``step`` on ``side``; ``cause`` is the error there.

    ``errno`` and ``command`` are the cause's. ``source_state`` / ``destination_state`` are
    the devices' states after the clean-up (None: not reachable); ``cleanup_errors`` lists
    what went wrong while cleaning up.
    """

    def __init__(
        self,
        step: MigrationStep,
        side: Side,
        cause: VfioUserError,
        *,
        source_state: MigState | None,
        destination_state: MigState | None,
        cleanup_errors: Sequence[str] = (),
    ) -> None:
        self.step = step
        self.side = side
        self.cause = cause
        self.source_state = source_state
        self.destination_state = destination_state
        self.cleanup_errors = tuple(cleanup_errors)
        left = f"source {_state_name(source_state)}, destination {_state_name(destination_state)}"
        message = f"{step} failed on the {side}: {cause}; left {left}"
        if self.cleanup_errors:
            message += "; clean-up: " + "; ".join(self.cleanup_errors)
        super().__init__(cause.errno, message, command=cause.command)

    def __str__(self) -> str:
        return self.message


def report_ranges(
    logged: Sequence[tuple[int, int]], maps: Sequence[DmaMap]
) -> list[tuple[int, int]]:
    """The ``(iova, length)`` reports that cover the logged ranges: each one's part in each
    DMA map, so that every report lies in one map and starts at its start when the logged
    range does (libvfio-user refuses others). No logged range means every write is logged
    (the spec's num_ranges 0): every map is reported whole. Unmapped IOVAs hold no memory
    to migrate and are not asked."""
    spans = logged or [(m.iova, m.size) for m in maps]
    pieces = []
    for iova, length in spans:
        for m in maps:
            lo, hi = max(iova, m.iova), min(iova + length, m.end)
            if lo < hi:
                pieces.append((lo, hi - lo))
    return sorted(pieces)


def _state_name(state: MigState | None) -> str:
    return "unreachable" if state is None else state.name


class _Failure(Exception):
    """A step failed (internal: becomes a MigrationError once both sides are cleaned up)."""

    def __init__(self, step: MigrationStep, side: Side, cause: VfioUserError) -> None:
        super().__init__(step, side, cause)
        self.step = step
        self.side = side
        self.cause = cause


ProgressCallback = Callable[[MigrationProgress], None]
SwitchoverCallback = Callable[[tuple[DirtyPages, ...] | None], Awaitable[None]]


async def migrate(
    source: Client,
    destination: Client,
    *,
    progress: ProgressCallback | None = None,
    pre_copy: bool | None = None,
    pre_copy_limit: int | None = None,
    track_dirty: bool | None = None,
    on_switchover: SwitchoverCallback | None = None,
) -> MigrationSummary:
    """Move the device state of ``source`` to ``destination`` (both connected clients).

    ``progress`` is called (synchronously) at each phase's start and after every chunk
    written. ``pre_copy``: None uses PRE_COPY when the source offers it; True requires it;
    False skips it. ``pre_copy_limit`` caps the bytes moved in PRE_COPY (a device that
    never runs out of pre-copy data would otherwise never stop). ``track_dirty``: None
    logs the source's DMA maps when it has some and supports logging; True requires it.
    ``on_switchover(dirty)`` runs with the source stopped and the destination RESUMING with
    all the data written, before it loads and runs it (``dirty``: the source's dirty pages,
    None when nothing was logged). See the module docstring for the steps and the failure policy.
    """
    if source is destination:
        raise ValueError("the source and the destination must be different clients")
    run = _Migration(source, destination, progress, pre_copy_limit, on_switchover)
    try:
        return await run.run(pre_copy, track_dirty)
    except _Failure as failure:
        states, errors = await run.recover()
        raise MigrationError(
            failure.step,
            failure.side,
            failure.cause,
            source_state=states[0],
            destination_state=states[1],
            cleanup_errors=errors,
        ) from failure.cause
    except BaseException:
        await run.recover()
        raise


@dataclass
class _Migration:
    source: Client
    destination: Client
    progress: ProgressCallback | None
    pre_copy_limit: int | None
    on_switchover: SwitchoverCallback | None
    started: float = field(default_factory=time.monotonic)
    total: int = 0
    phases: dict[Phase, PhaseStats] = field(default_factory=dict)
    #: Whether this call may have changed either device's state (a SET was sent).
    source_touched: bool = False
    destination_touched: bool = False
    #: Whether the destination was told to run (the last step).
    run_sent: bool = False
    started_logging: bool = False

    # --- the steps ------------------------------------------------------------------------

    async def run(self, pre_copy: bool | None, track_dirty: bool | None) -> MigrationSummary:
        use_pre_copy = await self._check(pre_copy)
        dirty_tracked = await self._start_logging(track_dirty)

        self.destination_touched = True
        await self._step(
            MigrationStep.RESUMING,
            "destination",
            self.destination.set_migration_state(MigState.RESUMING),
        )
        if use_pre_copy:
            self.source_touched = True
            pre_copied = time.monotonic()
            await self._step(
                MigrationStep.PRE_COPY, "source", self.source.set_migration_state(MigState.PRE_COPY)
            )
            await self._stream(Phase.PRE_COPY, self.pre_copy_limit, since=pre_copied)

        self.source_touched = True
        stopped = time.monotonic()
        await self._step(
            MigrationStep.STOP_COPY, "source", self.source.set_migration_state(MigState.STOP_COPY)
        )
        await self._stream(Phase.STOP_COPY, None, since=stopped)
        await self._step(
            MigrationStep.SOURCE_STOP, "source", self.source.set_migration_state(MigState.STOP)
        )
        dirty = await self._dirty_report() if dirty_tracked else None

        resume_started = time.monotonic()
        self._report(Phase.RESUME, 0)
        if self.on_switchover is not None:
            await self._switchover(dirty)
        await self._step(
            MigrationStep.LOAD, "destination", self.destination.set_migration_state(MigState.STOP)
        )
        self.run_sent = True
        await self._step(
            MigrationStep.RUN, "destination", self.destination.set_migration_state(MigState.RUNNING)
        )
        ended = time.monotonic()
        self.phases[Phase.RESUME] = PhaseStats(0, ended - resume_started)

        warnings = []
        if self.started_logging:
            try:
                await self.source.stop_dirty_logging()
            except VfioUserError as exc:
                warnings.append(f"stopping dirty logging on the source failed: {exc}")
        self._report(Phase.DONE, self.total)
        return MigrationSummary(
            bytes=self.total,
            seconds=ended - self.started,
            downtime=ended - stopped,
            phases=dict(self.phases),
            pre_copy=use_pre_copy,
            dirty=dirty,
            warnings=tuple(warnings),
        )

    async def _step(self, step: MigrationStep, side: Side, call: Awaitable[T]) -> T:
        """Await ``call``; its VfioUserError becomes a _Failure of ``step`` on ``side``."""
        try:
            return await call
        except VfioUserError as exc:
            raise _Failure(step, side, exc) from exc

    def _fail(self, step: MigrationStep, side: Side, message: str) -> _Failure:
        return _Failure(step, side, VfioUserError(errno.EINVAL, message))

    async def _check(self, pre_copy: bool | None) -> bool:
        """Both devices can migrate and are where a migration starts; whether to pre-copy."""
        offers_pre_copy = False
        sides: tuple[tuple[Side, Client], ...] = (
            ("source", self.source),
            ("destination", self.destination),
        )
        for side, client in sides:
            info = await self._step(MigrationStep.CHECK, side, client.migration_info())
            if not info.stop_copy:
                raise self._fail(MigrationStep.CHECK, side, f"the {side} cannot STOP_COPY")
            state = await self._step(MigrationStep.CHECK, side, client.migration_state())
            allowed = (MigState.RUNNING,) if side == "source" else (MigState.RUNNING, MigState.STOP)
            if state not in allowed:
                expected = " or ".join(s.name for s in allowed)
                raise self._fail(
                    MigrationStep.CHECK, side, f"the {side} is {state.name}, not {expected}"
                )
            if side == "source":
                offers_pre_copy = info.pre_copy
        if pre_copy and not offers_pre_copy:
            raise self._fail(MigrationStep.CHECK, "source", "the source does not offer PRE_COPY")
        return offers_pre_copy if pre_copy is None else pre_copy

    async def _start_logging(self, track_dirty: bool | None) -> bool:
        """Start dirty logging on the source's DMA maps if wanted; whether logging is on."""
        source = self.source
        if source.dirty_logging is not None:
            return True  # the caller's logging: used as it is
        if track_dirty is False or (track_dirty is None and not source.dma_maps):
            return False
        supported = await self._step(
            MigrationStep.DIRTY_START,
            "source",
            source.supports_feature(Feature.DMA_LOGGING_START, set=True),
        )
        if not supported:
            if track_dirty:
                raise self._fail(
                    MigrationStep.DIRTY_START, "source", "the source cannot log dirty pages"
                )
            return False
        if not source.dma_maps:
            raise self._fail(MigrationStep.DIRTY_START, "source", "the source has no DMA maps")
        await self._step(MigrationStep.DIRTY_START, "source", source.start_dirty_logging())
        self.started_logging = True
        return True

    async def _dirty_report(self) -> tuple[DirtyPages, ...]:
        logged = self.source.dirty_logging
        assert logged is not None
        reports = []
        for iova, length in report_ranges(logged.ranges, self.source.dma_maps):
            report = await self._step(
                MigrationStep.DIRTY_REPORT, "source", self.source.dirty_pages(iova, length)
            )
            reports.append(report)
        return tuple(reports)

    async def _switchover(self, dirty: tuple[DirtyPages, ...] | None) -> None:
        assert self.on_switchover is not None
        try:
            await self.on_switchover(dirty)
        except VfioUserError as exc:
            raise _Failure(MigrationStep.SWITCHOVER, "destination", exc) from exc
        except Exception as exc:
            cause = VfioUserError(errno.EIO, f"the switch-over callback failed: {exc!r}")
            raise _Failure(MigrationStep.SWITCHOVER, "destination", cause) from exc

    # --- the data stream ------------------------------------------------------------------

    def _report(self, phase: Phase, phase_bytes: int) -> None:
        if self.progress is not None:
            elapsed = time.monotonic() - self.started
            self.progress(MigrationProgress(phase, phase_bytes, self.total, elapsed))

    async def _stream(self, phase: Phase, limit: int | None, *, since: float) -> None:
        """Move the source's stream to the destination until a short read (or ``limit``);
        the phase's time counts from ``since``.

        A reader task and a writer task overlap the two sides; the first failure of either
        cancels both and is raised.
        """
        read_size = self.source.max_data_xfer_size
        send, receive = trio.open_memory_channel[bytes](_PIPELINE_DEPTH)
        moved = 0
        failures: list[BaseException] = []

        async def read() -> None:
            taken = 0
            async with send:
                while limit is None or taken < limit:
                    data = await self._step(
                        MigrationStep.READ, "source", self.source.read_migration_data(read_size)
                    )
                    taken += len(data)
                    if data:
                        await send.send(data)
                    if len(data) < read_size:
                        return

        async def write() -> None:
            nonlocal moved
            async for data in receive:
                await self._step(
                    MigrationStep.WRITE, "destination", self.destination.write_migration_data(data)
                )
                moved += len(data)
                self.total += len(data)
                self._report(phase, moved)

        async def guarded(task: Callable[[], Awaitable[None]]) -> None:
            try:
                await task()
            except Exception as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()

        self._report(phase, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, read)
            nursery.start_soon(guarded, write)
        receive.close()
        if failures:
            raise failures[0]
        self.phases[phase] = PhaseStats(moved, time.monotonic() - since)

    # --- after a failure ------------------------------------------------------------------

    async def recover(self) -> tuple[tuple[MigState | None, MigState | None], list[str]]:
        """Put both devices in the documented states; (their states, clean-up errors)."""
        errors: list[str] = []
        states: tuple[MigState | None, MigState | None] = (None, None)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
            destination = await self._state("destination", errors)
            may_run = not (self.run_sent and destination in (None, MigState.RUNNING))
            source = await self._restore_source(may_run, errors)
            if self.started_logging:
                await self._attempt(
                    "stopping dirty logging", errors, self.source.stop_dirty_logging()
                )
            if self.destination_touched and destination not in (None, MigState.RUNNING):
                destination = await self._reset_destination(destination, errors)
            states = (source, destination)
        if scope.cancelled_caught:
            errors.append(f"clean-up abandoned after {CLEANUP_TIMEOUT:g} s")
        return states, errors

    def _client(self, side: Side) -> Client:
        return self.source if side == "source" else self.destination

    async def _state(self, side: Side, errors: list[str]) -> MigState | None:
        """The state of ``side``; None (and an error noted, if we changed it) when unknown."""
        client = self._client(side)
        if client.closed:
            return None
        try:
            return await client.migration_state()
        except VfioUserError as exc:
            touched = self.source_touched if side == "source" else self.destination_touched
            if touched and not isinstance(exc, ConnectionClosedError):
                errors.append(f"asking the {side} for its state failed: {exc}")
            return None

    async def _attempt(self, what: str, errors: list[str], call: Awaitable[None]) -> None:
        try:
            await call
        except VfioUserError as exc:
            errors.append(f"{what} failed: {exc}")

    async def _restore_source(self, may_run: bool, errors: list[str]) -> MigState | None:
        state = await self._state("source", errors)
        stopped = (MigState.PRE_COPY, MigState.STOP_COPY, MigState.STOP)
        if self.source_touched and may_run and state in stopped:
            await self._attempt(
                "returning the source to RUNNING",
                errors,
                self.source.set_migration_state(MigState.RUNNING),
            )
            state = await self._state("source", errors)
        return state

    async def _reset_destination(self, state: MigState, errors: list[str]) -> MigState | None:
        client = self.destination
        if state == MigState.STOP:
            # STOP refuses DEVICE_RESET; RESUMING takes it without ever running the state.
            await self._attempt(
                "moving the destination to RESUMING",
                errors,
                client.set_migration_state(MigState.RESUMING),
            )
        try:
            await client.reset()
        except VfioUserError as exc:
            errors.append(f"resetting the destination failed: {exc}")
            return await self._state("destination", errors)
        state_after = await self._state("destination", errors)
        if state_after in (MigState.RESUMING, MigState.STOP):
            # The server kept the migration state across DEVICE_RESET (libvfio-user does
            # since its migration v2): leave it explicitly, then reset again, so the device
            # runs its reset state and nothing it may have loaded on the way out.
            await self._attempt(
                "returning the destination to RUNNING",
                errors,
                client.set_migration_state(MigState.RUNNING),
            )
            await self._attempt("resetting the destination again", errors, client.reset())
            state_after = await self._state("destination", errors)
        return state_after
