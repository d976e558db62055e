"""The client's migration driver, dirty-page reports and the ``migrate`` command, in process.

Devices are served on socketpairs in this process (a server can be "killed" by cancelling
it, which closes its socket as a dying process would). Every failure test checks the error's
step and side and the documented states of both devices afterwards.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.migration_pair import (
    DESTINATION_XFER,
    IOVA,
    MEMORY,
    PAGE,
    SOURCE_XFER,
    STATE,
    TIMEOUT,
    Blob,
    S,
    pair,
    served,
    state,
)
from vfiouser_trio.cli import ProgressPrinter, human_bytes, summary_lines
from vfiouser_trio.client import (
    ConnectionClosedError,
    DirtyPages,
    GuestMemory,
    MigrationError,
    MigrationProgress,
    MigrationStep,
    Phase,
    VfioUserError,
    connect,
    migrate,
)
from vfiouser_trio.examples.null import NullDevice
from vfiouser_trio.protocol import Feature, MigState
from vfiouser_trio.server.migration import MigrationRefused
from vfiouser_trio.server.serve import serve, serve_connection

pytestmark = pytest.mark.usefixtures("no_fd_leak")

ROOT = Path(__file__).resolve().parent.parent


# --- success ------------------------------------------------------------------------------


async def test_stop_copy_moves_the_state_in_chunks_and_reports_progress() -> None:
    reports: list[MigrationProgress] = []
    async with pair() as (src, dst):
        summary = await migrate(src.client, dst.client, progress=reports.append)
        assert dst.device.data == src.device.data
        assert (state(src.device), state(dst.device)) == (S.STOP, S.RUNNING)
        assert await src.client.migration_state() == S.STOP
        assert await dst.client.migration_state() == S.RUNNING
    assert not summary.pre_copy
    assert summary.bytes >= STATE
    assert list(summary.phases) == [Phase.STOP_COPY, Phase.RESUME]
    assert summary.phases[Phase.STOP_COPY].bytes == summary.bytes
    assert summary.dirty is None  # no DMA maps: nothing to log
    assert 0 < summary.downtime <= summary.seconds
    assert summary.throughput > 0
    # Written in pieces the destination accepts, more than one read's worth from the source.
    assert max(dst.device.chunk_sizes) <= DESTINATION_XFER
    assert len(dst.device.chunk_sizes) >= STATE // DESTINATION_XFER
    # Progress: each phase announced at 0, bytes growing, the total at the end.
    assert [r.phase for r in reports if r.phase_bytes == 0 and r.phase != Phase.RESUME] == [
        Phase.STOP_COPY
    ]
    assert [r.phase for r in reports][-2:] == [Phase.RESUME, Phase.DONE]
    totals = [r.total_bytes for r in reports]
    assert totals == sorted(totals)
    assert reports[-1].total_bytes == summary.bytes
    assert len(reports) > STATE // SOURCE_XFER


@pytest.mark.parametrize("wanted", [None, True, False])
async def test_pre_copy_used_when_offered(wanted: bool | None) -> None:
    reports: list[MigrationProgress] = []
    async with pair(Blob(seed=2, pre_copy=True)) as (src, dst):
        summary = await migrate(src.client, dst.client, progress=reports.append, pre_copy=wanted)
        assert dst.device.data == src.device.data
        assert (state(src.device), state(dst.device)) == (S.STOP, S.RUNNING)
    used = wanted is not False
    assert summary.pre_copy == used
    phases = list(dict.fromkeys(r.phase for r in reports))
    if used:
        assert phases == [Phase.PRE_COPY, Phase.STOP_COPY, Phase.RESUME, Phase.DONE]
        assert summary.phases[Phase.PRE_COPY].bytes >= STATE // 2
        assert summary.phases[Phase.STOP_COPY].bytes >= STATE - STATE // 2
    else:
        assert phases == [Phase.STOP_COPY, Phase.RESUME, Phase.DONE]
    moved = sum(s.bytes for p, s in summary.phases.items() if p != Phase.RESUME)
    assert moved == summary.bytes == reports[-1].total_bytes


async def test_pre_copy_limit_moves_on_to_stop_copy() -> None:
    async with pair(Blob(seed=3, pre_copy=True)) as (src, dst):
        summary = await migrate(src.client, dst.client, pre_copy_limit=1)
        assert dst.device.data == src.device.data
    assert 0 < summary.phases[Phase.PRE_COPY].bytes <= SOURCE_XFER


async def test_migrating_back_and_forth() -> None:
    async with pair() as (src, dst):
        await migrate(src.client, dst.client)
        dst.device.data[:4] = b"new!"
        await migrate(dst.client, src.client)  # the old source resumes from STOP
        assert src.device.data[:4] == b"new!"
        assert (state(src.device), state(dst.device)) == (S.RUNNING, S.STOP)


# --- dirty pages --------------------------------------------------------------------------


async def test_migration_reports_the_pages_the_device_wrote() -> None:
    with GuestMemory(MEMORY) as memory:
        async with pair() as (src, dst):
            await src.client.dma_map(memory, IOVA)
            await src.client.write(0, 0, (3 * PAGE).to_bytes(4, "little"))  # before logging
            src.device.stop_writes = [7 * PAGE + 100, 9 * PAGE - 8]  # two pages: 7 and 8
            seen: list[tuple[MigState, MigState, tuple[DirtyPages, ...] | None]] = []

            async def switchover(dirty: tuple[DirtyPages, ...] | None) -> None:
                seen.append((state(src.device), state(dst.device), dirty))

            summary = await migrate(src.client, dst.client, on_switchover=switchover)
            assert src.client.dirty_logging is None  # started and stopped by migrate()
            assert memory.read(7 * PAGE + 100, 8) == b"stopping"
    assert summary.dirty is not None
    [report] = summary.dirty
    assert (report.iova, report.length, report.page_size) == (IOVA, MEMORY, PAGE)
    assert report.addresses() == [IOVA + 7 * PAGE, IOVA + 8 * PAGE]
    assert list(report.runs()) == [(IOVA + 7 * PAGE, 2 * PAGE)]
    assert IOVA + 3 * PAGE not in report  # written before logging started
    assert seen == [(S.STOP, S.RESUMING, summary.dirty)]


async def test_logging_started_by_the_caller_is_used_and_kept() -> None:
    with GuestMemory(MEMORY) as memory:
        async with pair() as (src, dst):
            await src.client.dma_map(memory, IOVA)
            assert await src.client.start_dirty_logging() == PAGE
            await src.client.write(0, 0, (3 * PAGE).to_bytes(4, "little"))
            src.device.stop_writes = [5 * PAGE]
            summary = await migrate(src.client, dst.client)
            assert src.client.dirty_logging is not None
            assert summary.dirty is not None
            assert summary.dirty[0].addresses() == [IOVA + 3 * PAGE, IOVA + 5 * PAGE]
            # Still logging: the report cleared the bits, nothing new since.
            assert (await src.client.dirty_pages(IOVA, MEMORY)).count == 0
            await src.client.stop_dirty_logging()


async def test_track_dirty_required_without_maps_fails_the_check() -> None:
    async with pair() as (src, dst):
        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client, track_dirty=True)
        assert (caught.value.step, caught.value.side) == (MigrationStep.DIRTY_START, "source")
        assert (state(src.device), state(dst.device)) == (S.RUNNING, S.RUNNING)
        assert dst.device.resets == 0  # never touched


async def test_dirty_logging_api() -> None:
    with GuestMemory(MEMORY) as memory:
        device = Blob()
        with trio.fail_after(TIMEOUT):
            # A server limit of 64 bytes forces reports of 512 pages at most.
            async with served(device, 64) as one:
                client = one.client
                with pytest.raises(ValueError, match="no DMA maps"):
                    await client.start_dirty_logging()
                await client.dma_map(memory, IOVA)
                assert await client.supports_feature(Feature.DMA_LOGGING_START, set=True)
                assert not await client.supports_feature(Feature.DMA_LOGGING_START, get=True)
                assert await client.start_dirty_logging(page_size=512) == PAGE  # raised to it
                assert client.dirty_logging is not None
                assert client.dirty_logging.ranges == ((IOVA, MEMORY),)
                for offset in (0, 2 * PAGE + 1, 16 * PAGE - 8):
                    await client.write(0, 0, offset.to_bytes(4, "little"))

                pages = await client.dirty_pages(IOVA, MEMORY)
                assert pages.addresses() == [IOVA, IOVA + 2 * PAGE, IOVA + 15 * PAGE]
                assert pages.count == 3
                assert IOVA + 2 * PAGE + 5 in pages
                assert not pages.is_dirty(IOVA + PAGE)
                assert not pages.is_dirty(IOVA + MEMORY)  # outside the range
                assert list(pages.runs()) == [
                    (IOVA, PAGE),
                    (IOVA + 2 * PAGE, PAGE),
                    (IOVA + 15 * PAGE, PAGE),
                ]
                with pages.to_bitmap() as bitmap:
                    assert [bitmap.test(p) for p in (0, 1, 2, 15)] == [True, False, True, True]
                # Reported bits are cleared.
                assert (await client.dirty_pages(IOVA, MEMORY)).count == 0

                # Finer than the tracking page, in several reports (64-byte bitmaps).
                await client.write(0, 0, (PAGE + 8).to_bytes(4, "little"))
                fine = await client.dirty_pages(IOVA, 2 * PAGE, page_size=8)
                assert fine.n_pages == 2 * PAGE // 8 > 64 * 8
                assert list(fine.runs()) == [(IOVA + PAGE, PAGE)]

                await client.stop_dirty_logging()
                assert client.dirty_logging is None
                with pytest.raises(ValueError, match="not started"):
                    await client.dirty_pages(IOVA, MEMORY)
                with pytest.raises(VfioUserError) as caught:
                    await client.dirty_pages(IOVA, MEMORY, PAGE)
                assert caught.value.errno == errno.EINVAL
                await client.stop_dirty_logging()  # again: still fine


def test_dirty_pages_values() -> None:
    page = 0x1000
    whole = DirtyPages(0x10000, 64 * page, page, (1 | 1 << 63).to_bytes(8, "little"))
    tail = DirtyPages(0x10000 + 64 * page, 3 * page - 1, page, (0b100).to_bytes(8, "little"))
    joined = DirtyPages.concatenate([whole, tail])
    assert joined.addresses() == [0x10000, 0x10000 + 63 * page, 0x10000 + 66 * page]
    assert list(joined.runs())[-1] == (0x10000 + 66 * page, page - 1)  # clipped to the range
    after = DirtyPages(tail.iova + tail.length, page, page, bytes(8))
    with pytest.raises(ValueError, match="inside a bitmap word"):
        DirtyPages.concatenate([tail, after])
    with pytest.raises(ValueError, match="consecutive"):
        DirtyPages.concatenate([whole, whole])
    with pytest.raises(ValueError, match="power of two"):
        DirtyPages(0, page, 3000, bytes(8))
    with pytest.raises(ValueError, match="cannot cover"):
        DirtyPages(0, 65 * page, page, bytes(8))
    assert "3 of 67 pages" in repr(joined)


# --- failures -----------------------------------------------------------------------------


async def test_unmigratable_devices_fail_the_check_untouched() -> None:
    null = NullDevice()
    ours, theirs = socket.socketpair()
    async with pair() as (src, _), trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, null, theirs)
        async with connect(ours) as plain:
            with pytest.raises(MigrationError) as caught:
                await migrate(src.client, plain)
            assert (caught.value.step, caught.value.side) == (MigrationStep.CHECK, "destination")
            assert caught.value.errno == errno.EINVAL
            with pytest.raises(MigrationError) as caught:
                await migrate(plain, src.client)
            assert caught.value.side == "source"
            assert state(src.device) == S.RUNNING
    null.close()


async def test_check_refuses_wrong_states_and_missing_pre_copy() -> None:
    async with pair() as (src, dst):
        with pytest.raises(MigrationError, match="does not offer PRE_COPY") as caught:
            await migrate(src.client, dst.client, pre_copy=True)
        assert caught.value.step == MigrationStep.CHECK
        await src.client.set_migration_state(S.STOP)
        with pytest.raises(MigrationError, match="the source is STOP, not RUNNING"):
            await migrate(src.client, dst.client)
        await src.client.set_migration_state(S.RUNNING)
        await dst.client.set_migration_state(S.RESUMING)
        with pytest.raises(MigrationError, match="destination is RESUMING"):
            await migrate(src.client, dst.client)
        assert state(dst.device) == S.RESUMING  # untouched
        await dst.client.reset()
        await dst.client.set_migration_state(S.STOP)
        await migrate(src.client, dst.client)  # a stopped destination is fine
        assert dst.device.data == src.device.data
        with pytest.raises(ValueError, match="different clients"):
            await migrate(src.client, src.client)


@pytest.mark.parametrize("hook", ["stop", "begin_save"])
async def test_source_refusing_stop_copy(hook: str) -> None:
    async with pair() as (src, dst):
        src.device.failures[hook] = MigrationRefused("not now")
        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client)
        error = caught.value
        assert (error.step, error.side, error.errno) == (MigrationStep.STOP_COPY, "source", 22)
        assert error.cause.errno == errno.EINVAL
        assert isinstance(error.__cause__, VfioUserError)
        assert (error.source_state, error.destination_state) == (S.RUNNING, S.RUNNING)
        assert (state(src.device), state(dst.device)) == (S.RUNNING, S.RUNNING)
        assert dst.device.resets == 1  # the destination had gone to RESUMING: reset
        assert "stop-copy failed on the source" in str(error)
        # Both are usable: the migration works once the source agrees.
        del src.device.failures[hook]
        await migrate(src.client, dst.client)
        assert dst.device.data == src.device.data


async def test_source_stream_breaking() -> None:
    async with pair() as (src, dst):
        src.device.failures["save"] = RuntimeError("disk on fire")
        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client)
        assert (caught.value.step, caught.value.side) == (MigrationStep.READ, "source")
        assert caught.value.errno == errno.EIO
        assert (state(src.device), state(dst.device)) == (S.RUNNING, S.RUNNING)


async def test_destination_rejecting_the_data() -> None:
    async with pair() as (src, dst):
        dst.device.failures["load"] = ValueError("not my kind of state")
        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client)
        error = caught.value
        assert (error.step, error.side, error.errno) == (MigrationStep.LOAD, "destination", 5)
        assert (error.source_state, error.destination_state) == (S.RUNNING, S.RUNNING)
        assert (state(src.device), state(dst.device)) == (S.RUNNING, S.RUNNING)
        assert dst.device.resets == 1  # out of ERROR by DEVICE_RESET
        assert dst.device.data == bytes(STATE)  # never took the state


async def test_switchover_callback_failing_resets_the_destination() -> None:
    async def refuse(dirty: tuple[DirtyPages, ...] | None) -> None:
        raise OSError("no room for guest memory")

    async with pair() as (src, dst):
        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client, on_switchover=refuse)
        assert (caught.value.step, caught.value.side) == (MigrationStep.SWITCHOVER, "destination")
        assert "no room" in str(caught.value)
        assert (state(src.device), state(dst.device)) == (S.RUNNING, S.RUNNING)
        assert dst.device.resets == 1


@pytest.mark.parametrize(
    ("failure", "errno_"),
    [(MigrationRefused("not yet"), errno.EINVAL), (OSError("boom"), errno.EIO)],
)
async def test_destination_failing_to_run(failure: BaseException, errno_: int) -> None:
    async with pair() as (src, dst):
        dst.device.failures["run"] = failure
        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client)
        error = caught.value
        assert (error.step, error.side, error.errno) == (MigrationStep.RUN, "destination", errno_)
        # Refused: left in STOP (so RESUMING, then reset); otherwise ERROR (reset).
        assert (error.source_state, error.destination_state) == (S.RUNNING, S.RUNNING)
        assert (state(src.device), state(dst.device)) == (S.RUNNING, S.RUNNING)
        assert dst.device.resets == 1
        assert not error.cleanup_errors


async def test_clean_up_failures_are_reported() -> None:
    async with pair(destination=Blob(resettable=False)) as (src, dst):
        dst.device.failures["load"] = ValueError("no")
        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client)
        error = caught.value
        assert error.step == MigrationStep.LOAD
        assert (error.source_state, error.destination_state) == (S.RUNNING, S.ERROR)
        [problem] = error.cleanup_errors
        assert problem.startswith("resetting the destination failed: [EINVAL]")
        assert "destination ERROR; clean-up: resetting" in str(error)


async def test_destination_dying_mid_stream() -> None:
    async with pair() as (src, dst):

        def kill_destination(report: MigrationProgress) -> None:
            if report.phase == Phase.STOP_COPY and report.phase_bytes > 0:
                dst.kill()

        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client, progress=kill_destination)
        error = caught.value
        assert (error.step, error.side) == (MigrationStep.WRITE, "destination")
        assert isinstance(error.cause, ConnectionClosedError)
        assert (error.source_state, error.destination_state) == (S.RUNNING, None)
        assert state(src.device) == S.RUNNING
        # Unreachable, so not reset by migrate(); its server saw the client go, discarded
        # the partial stream and runs the device again with its old state.
        assert state(dst.device) == S.RUNNING
        assert "destination unreachable" in str(error)


async def test_source_dying_mid_stream() -> None:
    async with pair() as (src, dst):

        def kill_source(report: MigrationProgress) -> None:
            if report.phase == Phase.STOP_COPY and report.phase_bytes > 0:
                src.kill()

        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client, progress=kill_source)
        error = caught.value
        assert (error.step, error.side) == (MigrationStep.READ, "source")
        assert (error.source_state, error.destination_state) == (None, S.RUNNING)
        assert state(dst.device) == S.RUNNING
        assert dst.device.resets == 1


async def test_destination_lost_while_told_to_run_keeps_the_source_stopped() -> None:
    async with pair() as (src, dst):
        dst.device.on_run_action = dst.kill  # the reply to "run" never comes
        with pytest.raises(MigrationError) as caught:
            await migrate(src.client, dst.client)
        error = caught.value
        assert (error.step, error.side) == (MigrationStep.RUN, "destination")
        # The destination may be running: the source must not run too.
        assert (error.source_state, error.destination_state) == (S.STOP, None)
        assert state(src.device) == S.STOP


async def test_cancelled_migration_cleans_up() -> None:
    async with pair() as (src, dst):
        with trio.CancelScope() as scope:

            def cancel(report: MigrationProgress) -> None:
                if report.phase == Phase.STOP_COPY and report.phase_bytes > 0:
                    scope.cancel()

            await migrate(src.client, dst.client, progress=cancel)
        assert scope.cancelled_caught
        assert (state(src.device), state(dst.device)) == (S.RUNNING, S.RUNNING)
        assert dst.device.resets == 1


# --- the command --------------------------------------------------------------------------


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def run_migrate_command(
    source: str, destination: str, *options: str
) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "vfiouser_trio.cli", "migrate", source, destination, *options]
    return await trio.run_process(
        argv, capture_stdout=True, capture_stderr=True, env=env(), check=False
    )


async def test_migrate_command_between_served_sockets(tmp_path: Path) -> None:
    source, destination, null = Blob(seed=4, pre_copy=True), Blob(), NullDevice()
    paths = [tmp_path / name for name in ("src.sock", "dst.sock", "null.sock")]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for device, path in zip((source, destination, null), paths, strict=True):
                await nursery.start(serve, device, path)
            done = await run_migrate_command(str(paths[0]), str(paths[1]))
            failed = await run_migrate_command(str(paths[1]), str(paths[2]))
            missing = await run_migrate_command(str(tmp_path / "nothing"), str(paths[1]))
            nursery.cancel_scope.cancel()
    for device in (source, destination, null):
        device.close()

    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "\r" not in out  # not a terminal: plain lines
    lines = out.splitlines()
    assert lines[0] == "pre-copy: 0 B (0 B in all)"
    assert any(line.startswith("stop-copy: ") for line in lines)
    assert any(line.startswith("migrated 300 KiB in ") for line in lines)
    assert destination.data == source.data
    # The command's connection to the source is gone: the source runs again (state kept).
    assert (state(source), state(destination)) == (S.RUNNING, S.RUNNING)

    assert failed.returncode == 1
    assert "check failed on the destination" in failed.stderr.decode()
    assert state(destination) == S.RUNNING  # untouched

    assert missing.returncode == 1
    assert "cannot connect" in missing.stderr.decode()


def test_progress_printer_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=True)
    printer(MigrationProgress(Phase.STOP_COPY, 0, 0, 0.0))
    printer(MigrationProgress(Phase.STOP_COPY, 1 << 20, 1 << 20, 0.01))  # too soon: skipped
    printer(MigrationProgress(Phase.STOP_COPY, 2 << 20, 2 << 20, 0.5))
    printer(MigrationProgress(Phase.DONE, 2 << 20, 2 << 20, 0.6))
    printer.finish()
    text = out.getvalue()
    assert text.count("\r") == 3
    assert "\n" not in text[:-1] and text.endswith("\n")
    assert "[############............] stop-copy: 2.0 MiB (2.0 MiB in all, 4.0 MiB/s)" in text
    assert "[########################] done" in text


def test_summary_lines() -> None:
    from vfiouser_trio.client import MigrationSummary, PhaseStats  # noqa: PLC0415

    summary = MigrationSummary(
        bytes=64 << 20,
        seconds=0.5,
        downtime=0.25,
        phases={Phase.STOP_COPY: PhaseStats(64 << 20, 0.25), Phase.RESUME: PhaseStats(0, 0.01)},
        pre_copy=False,
        dirty=(DirtyPages(0, 0x4000, 0x1000, b"\x05" + bytes(7)),),
        warnings=("a warning",),
    )
    assert summary_lines(summary) == [
        "migrated 64 MiB in 0.500 s: 256 MiB/s, downtime 0.250 s",
        "  stop-copy: 64 MiB in 0.250 s",
        "  resume: 0 B in 0.010 s",
        "  guest pages dirtied by the device: 2",
        "  warning: a warning",
    ]


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 512, 1023, 1024, 12 * 1024, 1536 << 10, 300 << 20)] == [
        "0 B",
        "512 B",
        "1023 B",
        "1.0 KiB",
        "12 KiB",
        "1.5 MiB",
        "300 MiB",
    ]
    assert human_bytes(5 << 40) == "5.0 TiB"


async def test_migrate_command_options(tmp_path: Path) -> None:
    source, destination, plain = Blob(seed=6, pre_copy=True), Blob(), Blob(seed=7)
    paths = [tmp_path / name for name in ("src.sock", "dst.sock", "plain.sock")]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for device, path in zip((source, destination, plain), paths, strict=True):
                await nursery.start(serve, device, path)
            src, dst, other = map(str, paths)
            skipped = await run_migrate_command(
                src, dst, "--no-pre-copy", "--max-data-xfer-size=4K"
            )
            required = await run_migrate_command(other, dst, "--pre-copy")
            bad = await run_migrate_command(src, dst, "--max-data-xfer-size", "32")
            nursery.cancel_scope.cancel()
    for device in (source, destination, plain):
        device.close()

    assert skipped.returncode == 0, skipped.stderr.decode()
    out = skipped.stdout.decode()
    assert "pre-copy" not in out
    assert destination.data == source.data
    assert max(destination.chunk_sizes) <= 4096  # the command's own limit, not the servers'

    assert required.returncode == 1
    assert "the source does not offer PRE_COPY" in required.stderr.decode()

    assert bad.returncode == 2
    assert bad.stderr.decode().startswith("vfio-user-trio migrate: --max-data-xfer-size: ")
