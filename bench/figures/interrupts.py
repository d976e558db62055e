"""Figure 4: interrupt latency, as an eventfd ping-pong through the server.

The server (its own process) serves :class:`~bench.devices.IrqEchoDevice`: a task awaiting
the device's doorbell calls ``trigger()`` on MSI-X vector 0. The client (this process) gets
the doorbell's ioeventfd with GET_REGION_IO_FDS and an interrupt eventfd with SET_IRQS, then
rings the doorbell and waits for the interrupt, over and over. That is two eventfd hops per
round, like the raw C eventfd ping-pong between two processes that is the baseline.

Two clients are measured: a trio client (``Interrupt.wait()``, the whole stack on both sides)
and a blocking loop on the same two eventfds (what a hypervisor's ioeventfd/irqfd pair sees:
the server's share of the latency). The target judges the median round trip of each.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bench.baselines import LatencyResult, run_eventfd_pingpong
from bench.devices import DOORBELL_BAR
from vfiouser_trio.client import connect
from vfiouser_trio.protocol.constants import PciIrq

from .common import Row, Settings, Target, median, micros, rate, ratio
from .processes import device_socket, many_devices_server

FIGURE = 4
TARGET = Target.ratio_at_most(2.0)
WARMUP_ROUNDS = 100
SETUP_TIMEOUT = 30.0


class Latencies:
    """Round-trip samples of one run, in nanoseconds."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.seconds = 0.0

    def percentile_us(self, pct: int) -> float:
        """Nearest-rank percentile, as the C tools compute it."""
        ordered = sorted(self.samples)
        rank = max(1, (len(ordered) * pct + 99) // 100)
        return ordered[rank - 1] / 1000

    @property
    def rate(self) -> float:
        return len(self.samples) / self.seconds


async def _trio_rounds(
    ring: Callable[[], None], wait: Callable[[], Awaitable[int]], seconds: float
) -> Latencies:
    for _ in range(WARMUP_ROUNDS):
        ring()
        await wait()
    result = Latencies()
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    while True:
        t0 = clock()
        ring()
        await wait()
        t1 = clock()
        result.samples.append(t1 - t0)
        if t1 >= deadline:
            break
    result.seconds = (t1 - start) / 1e9
    return result


def _blocking_rounds(bell_fd: int, irq_fd: int, seconds: float) -> Latencies:
    """The same rounds with plain blocking syscalls (the trio loop is deliberately stalled)."""
    os.set_blocking(irq_fd, True)
    try:
        for _ in range(WARMUP_ROUNDS):
            os.eventfd_write(bell_fd, 1)
            os.eventfd_read(irq_fd)
        result = Latencies()
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(seconds * 1e9)
        while True:
            t0 = clock()
            os.eventfd_write(bell_fd, 1)
            os.eventfd_read(irq_fd)
            t1 = clock()
            result.samples.append(t1 - t0)
            if t1 >= deadline:
                break
        result.seconds = (t1 - start) / 1e9
        return result
    finally:
        os.set_blocking(irq_fd, False)


@dataclass
class Runs:
    """Every run of figure 4, by client."""

    trio: list[Latencies] = field(default_factory=list)
    blocking: list[Latencies] = field(default_factory=list)
    raw: list[LatencyResult] = field(default_factory=list)


async def _measure(settings: Settings, path: Path) -> Runs:
    runs = Runs()
    async with connect(path) as client:
        with trio.fail_after(SETUP_TIMEOUT):
            irq = (await client.enable_irqs(PciIrq.MSIX, 1))[0]
            io_fds = await client.region_io_fds(DOORBELL_BAR)
        bell = next(fd for fd in io_fds if fd.is_ioeventfd)
        seconds = settings.seconds

        async def raw() -> None:
            runs.raw.append(await trio.to_thread.run_sync(run_eventfd_pingpong, seconds))

        async def ours_trio() -> None:
            runs.trio.append(await _trio_rounds(bell.ring, irq.wait, seconds))

        async def ours_blocking() -> None:
            fds = (bell.eventfd.fileno(), irq.eventfd.fileno())
            runs.blocking.append(_blocking_rounds(*fds, seconds))
            await trio.lowlevel.checkpoint()

        for rep in range(settings.repeats):
            steps = [ours_trio, ours_blocking, raw]
            for step in steps if rep % 2 == 0 else reversed(steps):
                await step()
    return runs


def measure(settings: Settings) -> list[Row]:
    """Figure 4's rows: the trio client, then the blocking client."""
    with (
        tempfile.TemporaryDirectory(prefix="vfu-bench-irq-") as tmp,
        many_devices_server("bench.devices:IrqEchoDevice", 1, Path(tmp)) as server,
    ):
        runs = trio.run(_measure, settings, device_socket(Path(tmp), 0))
        server.check_alive()
    raw_p50 = median([r.median_us for r in runs.raw])
    raw_p99 = median([r.p99_us for r in runs.raw])
    raw_rate = median([r.round_trips_per_s for r in runs.raw])
    baseline = (
        f"raw C eventfd ping-pong p50 {micros(raw_p50)}, p99 {micros(raw_p99)} ({rate(raw_rate)})"
    )
    rows = []
    for label, mine in (
        ("trio client (Interrupt.wait)", runs.trio),
        ("blocking client (server's share)", runs.blocking),
    ):
        p50 = median([m.percentile_us(50) for m in mine])
        p99 = median([m.percentile_us(99) for m in mine])
        per_s = median([m.rate for m in mine])
        rows.append(
            Row(
                FIGURE,
                f"interrupt: doorbell → trigger() → eventfd wake-up, {label}",
                f"p50 {micros(p50)}, p99 {micros(p99)} ({rate(per_s)})",
                baseline,
                ratio(p50, raw_p50),
                TARGET,
            )
        )
    return rows
