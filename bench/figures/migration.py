"""Figure 6: live-migration throughput of device state between two server processes.

Two server processes (``vfio-user-trio serve bench.figures.migration:StateDevice``) each
serve a device holding :data:`STATE_SIZE` bytes of state. This process is the client of
both and migrates the device back and forth with :func:`~vfiouser_trio.client.migrate`:
every byte goes source process → this process → destination process, in chunks of the
servers' ``max_data_xfer_size`` (MIG_DATA_READ / MIG_DATA_WRITE), reading and writing
overlapped. Two cases: stop-copy only, and pre-copy (half of the state moves while the
device runs) then stop-copy; the cell also gives the downtime (source stopped until the
destination runs). Throughput is the state's bytes over the whole ``migrate()`` call.

The baseline, measured in the same run: the same bytes read by the same client from one of
the same server processes with REGION_READ (1 MiB reads of a BAR whose handler returns a
slice of the state): the framework's one-hop data path, where a migration takes two hops.
For scale the cell also gives the same bytes through one AF_UNIX socketpair between two
trio tasks of this process (no protocol, no second process).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from vfiouser_trio.client import Client, connect, migrate
from vfiouser_trio.server import Device, PciIdentity

from .common import BenchError, Row, Settings, bandwidth, median, ratio, size_label
from .processes import cli_server
from .sockets import socketpair_mb_per_s

FIGURE = 6
STATE_SIZE = 64 << 20
CHUNK = 1 << 20
PEER_TIMEOUT = 120.0
DEVICE = "bench.figures.migration:StateDevice"

# 0x1234 is the vendor ID QEMU's test devices use; this device never leaves the bench.
STATE_IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7EB2, class_code=0xFF0000)


class StateDevice(Device):
    """A device whose migration state is :data:`STATE_SIZE` bytes, in chunks of :data:`CHUNK`.

    It offers PRE_COPY: the first half of the state may move while it runs.
    """

    def __init__(self) -> None:
        super().__init__(STATE_IDENTITY, name="state")
        self.state = bytearray(b"\xa5" * STATE_SIZE)
        self._received = 0
        self._precopied = 0
        self.add_bar(0, CHUNK, read=self._read_bar0)
        self.enable_migration(pre_copy=True)

    async def _read_bar0(self, offset: int, size: int) -> bytes:
        return bytes(self.state[offset : offset + size])

    async def on_begin_save(self) -> None:
        self._precopied = 0

    async def precopy_chunks(self) -> AsyncIterator[bytes]:
        view = memoryview(self.state)
        for start in range(0, STATE_SIZE // 2, CHUNK):
            self._precopied = start + CHUNK
            yield bytes(view[start : start + CHUNK])

    async def save_chunks(self) -> AsyncIterator[bytes]:
        view = memoryview(self.state)
        for start in range(self._precopied, STATE_SIZE, CHUNK):
            yield bytes(view[start : start + CHUNK])

    async def on_begin_resume(self) -> None:
        self._received = 0

    async def load_chunk(self, data: bytes) -> None:
        end = self._received + len(data)
        if end > STATE_SIZE:
            raise ValueError(f"more than {STATE_SIZE} bytes of state")
        self.state[self._received : end] = data
        self._received = end

    async def on_end_resume(self) -> None:
        if self._received != STATE_SIZE:
            raise ValueError(f"{self._received} bytes of state, expected {STATE_SIZE}")


async def _region_read_mb_per_s(client: Client) -> float:
    """MB/s of reading :data:`STATE_SIZE` bytes of BAR0 with REGION_READ, a chunk at a time."""
    started = time.perf_counter()
    for _ in range(STATE_SIZE // CHUNK):
        await client.read(0, 0, CHUNK, use_mmap=False)
    return STATE_SIZE / (time.perf_counter() - started) / 1e6


async def _migrate_mb_per_s(
    source: Client, destination: Client, *, pre_copy: bool
) -> tuple[float, float]:
    """(MB/s over the whole migration, downtime in seconds)."""
    summary = await migrate(source, destination, pre_copy=pre_copy)
    if summary.bytes < STATE_SIZE:
        raise BenchError(f"only {summary.bytes} bytes of state moved")
    return summary.bytes / summary.seconds / 1e6, summary.downtime


async def _measure(settings: Settings, paths: tuple[Path, Path]) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    with trio.fail_after(PEER_TIMEOUT):
        async with connect(paths[0]) as first, connect(paths[1]) as second:
            clients = [first, second]

            async def baselines() -> None:
                results.setdefault("read", []).append(await _region_read_mb_per_s(clients[0]))
                socketpair = await socketpair_mb_per_s(STATE_SIZE, CHUNK)
                results.setdefault("socketpair", []).append(socketpair)

            for rep in range(settings.repeats):
                if rep % 2 == 0:
                    await baselines()
                for case, pre_copy in (("stop", False), ("pre", True)):
                    # Back and forth: the last destination is the next source.
                    source, destination = clients
                    mb, downtime = await _migrate_mb_per_s(source, destination, pre_copy=pre_copy)
                    results.setdefault(case, []).append(mb)
                    results.setdefault(f"{case}-downtime", []).append(downtime)
                    clients.reverse()
                if rep % 2 == 1:
                    await baselines()
    return results


def measure(settings: Settings) -> list[Row]:
    """Figure 6's rows: stop-copy only, then pre-copy and stop-copy."""
    with tempfile.TemporaryDirectory(prefix="vfu-bench-mig-") as tmp:
        paths = (Path(tmp) / "a.sock", Path(tmp) / "b.sock")
        with cli_server(DEVICE, paths[0]) as a, cli_server(DEVICE, paths[1]) as b:
            results = trio.run(_measure, settings, paths)
            a.check_alive()
            b.check_alive()
    base = median(results["read"])
    socketpair = median(results["socketpair"])
    baseline = (
        f"REGION_READ {bandwidth(base)} (AF_UNIX socketpair in Python: {bandwidth(socketpair)})"
    )
    rows = []
    for case, label in (("stop", "stop-copy only"), ("pre", "half pre-copied, then stop-copy")):
        ours = median(results[case])
        downtime_ms = median(results[f"{case}-downtime"]) * 1000
        rows.append(
            Row(
                FIGURE,
                f"migration of {size_label(STATE_SIZE)} of device state, {label}",
                f"{bandwidth(ours)} (downtime {downtime_ms:.0f} ms)",
                baseline,
                ratio(ours, base),
                None,
            )
        )
    return rows
