"""Live migration between two server processes, in the middle of a DMA workload.

Two ``vfio-user-trio serve dmaengine`` processes serve the DMA engine example. This test is
the VMM: guest memory A is mapped on the source and B on the destination. The engine copies pages
on the source (batch 1 completes, batch 2 is rung and left running), then ``migrate()``
moves the engine; the VMM's RAM copy is a bulk copy of A to B before the migration plus the
pages the dirty log reports at the switch-over. The destination then finishes batch 2 and
does batch 3: B must hold exactly what one engine doing all three batches would have left,
which only holds if every page the source device wrote was reported dirty.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from vfiouser_trio.client import Client, DirtyPages, GuestMemory, Phase, connect, migrate
from vfiouser_trio.examples import dmaengine as de
from vfiouser_trio.examples.dmaengine import descriptor
from vfiouser_trio.protocol.constants import MigState, PciIrq, PciRegion
from vfiouser_trio.server.pci import COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "vfiouser_trio.cli"]
TIMEOUT = 60
PAGE = 4096
IOVA = 0x100_0000
#: Guest memory: the ring in pages 0..7, sources in pages 8..31, destinations in 32..55.
PAGES = 64
RING_SIZE = 1024
BUFFERS = 24
SOURCE_PAGE, DESTINATION_PAGE = 8, 32
#: Descriptor i copies source buffer i % BUFFERS to destination buffer i % BUFFERS. Batch 2
#: is long, so that the engine is still at it when the migration stops it (usually).
BATCHES = (range(0, 8), range(8, 608), range(608, 624))
COPIES = BATCHES[-1][-1] + 1


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@asynccontextmanager
async def server_process(spec: str, path: Path) -> AsyncIterator[list[bytes]]:
    """``serve SPEC --socket-path=PATH`` once it says it is serving; yields its stderr so far.

    Its stderr keeps being drained (and collected); on exit it gets SIGTERM and must exit 0.
    """
    proc = await trio.lowlevel.open_process(
        [*CLI, "serve", spec, f"--socket-path={path}"], env=env(), stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    log: list[bytes] = []
    try:
        with trio.fail_after(TIMEOUT):
            while b"serving " not in b"".join(log):
                chunk = await proc.stderr.receive_some()
                assert chunk, f"server exited early: {b''.join(log).decode()}"
                log.append(bytes(chunk))
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                assert proc.stderr is not None
                while chunk := await proc.stderr.receive_some():
                    log.append(bytes(chunk))

            nursery.start_soon(drain)
            yield log
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(TIMEOUT):
                await proc.wait()
        assert proc.returncode == 0, b"".join(log).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.stderr.aclose()


def pattern(index: int) -> bytes:
    return bytes([index + 1]) * (PAGE // 2) + os.urandom(PAGE // 2)


def post(memory: GuestMemory, index: int) -> None:
    """Post descriptor ``index``: its fields first, then VALID (the device's ownership)."""
    src = IOVA + (SOURCE_PAGE + index % BUFFERS) * PAGE
    dst = IOVA + (DESTINATION_PAGE + index % BUFFERS) * PAGE
    offset = index * de.DESCRIPTOR_SIZE
    memory.write(offset, descriptor(src, dst, PAGE, valid=False))
    memory.write(offset + de.FLAGS_OFFSET, struct.pack("<I", de.DESC_VALID))


def done(memory: GuestMemory, index: int) -> bool:
    flags, status = de.descriptor_status(
        memory.read(index * de.DESCRIPTOR_SIZE, de.DESCRIPTOR_SIZE)
    )
    return not flags & de.DESC_VALID and status == de.DESC_DONE


async def register(client: Client, offset: int) -> int:
    value: int = struct.unpack("<I", await client.read(PciRegion.BAR0, offset, 4))[0]
    return value


async def ring_doorbell(client: Client, tail: int) -> None:
    await client.write(PciRegion.BAR0, de.TAIL, struct.pack("<I", tail))


async def prepare(client: Client, memory: GuestMemory) -> None:
    """What the VMM sets up on either side while the device runs: memory, bus master, MSI-X."""
    await client.dma_map(memory, IOVA)
    await client.config.write(COMMAND, COMMAND_MEMORY | COMMAND_BUS_MASTER, 2)
    await client.enable_irqs(PciIrq.MSIX)


async def wait_completed(client: Client, count: int) -> None:
    irq = client.irq(PciIrq.MSIX)
    while await register(client, de.COMPLETED) < count:
        await irq.wait()


async def test_migrating_the_dma_engine_mid_workload(tmp_path: Path) -> None:
    patterns = [pattern(i) for i in range(BUFFERS)]
    with (
        trio.fail_after(TIMEOUT),
        GuestMemory(PAGES * PAGE) as a,
        GuestMemory(PAGES * PAGE) as b,
    ):
        for i, data in enumerate(patterns):
            a.write((SOURCE_PAGE + i) * PAGE, data)
        async with (
            server_process("dmaengine", tmp_path / "src.sock"),
            server_process("dmaengine", tmp_path / "dst.sock"),
            connect(tmp_path / "src.sock") as source,
            connect(tmp_path / "dst.sock") as destination,
        ):
            await prepare(source, a)
            await prepare(destination, b)
            assert (await source.migration_info()).stop_copy
            assert await destination.migration_state() == MigState.RUNNING
            await source.write(PciRegion.BAR0, de.RING_BASE_LO, struct.pack("<Q", IOVA))
            await source.write(PciRegion.BAR0, de.RING_SIZE, struct.pack("<I", RING_SIZE))
            control = de.CONTROL_ENABLE | de.CONTROL_IRQ_ENABLE
            await source.write(PciRegion.BAR0, de.CONTROL, struct.pack("<I", control))
            assert await source.start_dirty_logging() == PAGE

            # Batch 1 runs to completion on the source.
            for i in BATCHES[0]:
                post(a, i)
            await ring_doorbell(source, BATCHES[0][-1] + 1)
            await wait_completed(source, len(BATCHES[0]))

            # Batch 2 is posted, RAM goes over in bulk, the doorbell rings: migrate now.
            for i in BATCHES[1]:
                post(a, i)
            b.write(0, a.read(0, PAGES * PAGE))
            await ring_doorbell(source, BATCHES[1][-1] + 1)

            before_switch: list[int] = []
            reports: list[DirtyPages] = []

            async def copy_dirty_pages(dirty: tuple[DirtyPages, ...] | None) -> None:
                assert dirty is not None
                reports.extend(dirty)
                before_switch.extend(i for i in range(COPIES) if done(a, i))
                for report in dirty:
                    for iova, length in report.runs():
                        b.write(iova - IOVA, a.read(iova - IOVA, length))

            phases: list[Phase] = []
            summary = await migrate(
                source,
                destination,
                on_switchover=copy_dirty_pages,
                progress=lambda report: phases.append(report.phase),
            )
            assert await source.migration_state() == MigState.STOP
            assert await destination.migration_state() == MigState.RUNNING
            assert phases[-1] == Phase.DONE
            assert summary.bytes > 0

            # Batch 3 on the destination; it finishes what batch 2 left too.
            for i in BATCHES[2]:
                post(b, i)
            await ring_doorbell(destination, BATCHES[2][-1] + 1)
            await wait_completed(destination, COPIES)
            head = await register(destination, de.HEAD)
            errors = await register(destination, de.ERRORS)
            await source.stop_dirty_logging()

        # Everything the device did before the switch was reported dirty, nothing it only read.
        assert set(BATCHES[0]) <= set(before_switch)
        [report] = reports
        for i in before_switch:
            assert report.is_dirty(i * de.DESCRIPTOR_SIZE + IOVA)  # the status written back
            assert report.is_dirty(IOVA + (DESTINATION_PAGE + i % BUFFERS) * PAGE)
        assert not any(report.is_dirty(IOVA + (SOURCE_PAGE + i) * PAGE) for i in range(BUFFERS))
        # The destination ends where one engine doing all of it would have.
        assert (head, errors) == (COPIES, 0)
        assert all(done(b, i) for i in range(COPIES))
        for i, data in enumerate(patterns):
            assert b.read((DESTINATION_PAGE + i) * PAGE, PAGE) == data, f"copy {i}"
