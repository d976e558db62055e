"""Figure 5: many devices in one server process, a client each.

One server process (``python -m bench.devices serve gpio --count N+1``) serves the gpio
example N+1 times, on a socket each. For every scale n, n C load generators run at once,
one per device (4-byte REGION_READs of BAR2, one at a time); the aggregate rate is all their
round trips over the span from the first one's measuring window to the last one's end (which
understates it slightly rather than overstating it). The baseline is the same server's rate
with one device and one client, measured in the same repeat.

Memory: a server of its own serves ``Settings.idle_connections`` gpio devices (1,000 in a full
run; issue 12's target is 1,000 idle connections in one process at ≤ 16 KiB each) and one
more for warming up. With every device built and one connection made and dropped (so one-time
imports and caches are already paid), the server's VmRSS is read; then one trio client per
device connects, reads a register and stays idle, and VmRSS is read again. The difference over
the connection count is the memory of one idle connection: the session, its engine and core,
twin socket and buffers. Both processes need about three fds per connection: the benchmark
raises its RLIMIT_NOFILE soft limit to the hard one (the server inherits it).
"""

from __future__ import annotations

import resource
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.baselines import LoadgenResult, LoadMode, run_loadgen
from vfiouser_trio.client import Client, connect

from .common import BenchError, Row, Settings, Target, median, rate, ratio
from .processes import ServerProcess, device_socket, many_devices_server, retry_busy, rss_kib

FIGURE = 5
GPIO_BAR = 2
MEMORY_TARGET_KIB = 16
MEMORY_TARGET = Target(MEMORY_TARGET_KIB, False, f"≤ {MEMORY_TARGET_KIB} KiB")
#: Seconds for all the idle clients to connect (each negotiates and reads every info).
CONNECT_TIMEOUT = 300.0
#: File descriptors per idle connection in the busier of the two processes (the server: its
#: main and twin socket, plus its share of the listeners), and a margin for the rest.
FDS_PER_CONNECTION = 3
FD_MARGIN = 256


@dataclass(frozen=True, slots=True)
class Aggregate:
    round_trips_per_s: float
    #: Median over the clients of each one's own median latency, in µs.
    median_us: float


def run_parallel(paths: list[Path], seconds: float) -> Aggregate:
    """One load generator per path, all at once; their aggregate rate."""
    results: list[tuple[LoadgenResult, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(path: Path) -> None:
        try:
            result = retry_busy(
                lambda: run_loadgen(path, LoadMode.READ, seconds=seconds, region=GPIO_BAR, size=4)
            )
            ended = time.monotonic()
            with lock:
                results.append((result, ended))
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=one, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"{len(errors)} of {len(paths)} load generators failed: {errors[0]}")
    first_start = min(ended - r.seconds for r, ended in results)
    last_end = max(ended for _, ended in results)
    total = sum(r.round_trips for r, _ in results)
    return Aggregate(total / (last_end - first_start), median([r.median_us for r, _ in results]))


@asynccontextmanager
async def idle_clients(paths: list[Path]) -> AsyncIterator[list[Client]]:
    """A connected, negotiated trio client on each path, left idle."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect(p)) for p in paths]


def raise_fd_limit(needed: int) -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard one if ``needed`` fds would not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise BenchError(f"{needed} fds needed, RLIMIT_NOFILE's hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def idle_memory(count: int) -> tuple[float, int]:
    """KiB of server RSS per idle connection with ``count`` of them, and the server's RSS
    (KiB) at the end."""
    raise_fd_limit(FDS_PER_CONNECTION * count + FD_MARGIN)
    with tempfile.TemporaryDirectory(prefix="vfu-bench-idle-") as tmp:
        directory = Path(tmp)
        # Device `count` is the warm-up device.
        with many_devices_server("gpio", count + 1, directory, timeout=CONNECT_TIMEOUT) as server:
            paths = [device_socket(directory, i) for i in range(count)]
            per_connection = trio.run(
                _memory_per_connection, server, paths, device_socket(directory, count)
            )
            server.check_alive()
            return per_connection, rss_kib(server.pid)


async def _memory_per_connection(server: ServerProcess, paths: list[Path], warm: Path) -> float:
    """KiB of server RSS per idle connection to each of ``paths``."""
    with trio.fail_after(CONNECT_TIMEOUT):
        return await _memory_delta(server, paths, warm)


async def _memory_delta(server: ServerProcess, paths: list[Path], warm: Path) -> float:
    async with idle_clients([warm]) as clients:
        await clients[0].read(GPIO_BAR, 0, 4)
    # The server tears the warm-up session down on its own time; let it.
    await trio.sleep(0.2)
    before = rss_kib(server.pid)
    async with idle_clients(paths) as clients:
        for client in clients:
            await client.read(GPIO_BAR, 0, 4)  # every session has served a request
        after = rss_kib(server.pid)
    return (after - before) / len(paths)


def measure(settings: Settings) -> list[Row]:
    """Figure 5's rows: aggregate rate per scale, then memory per idle connection."""
    scales = settings.scales
    largest = max(scales)
    rates: dict[int, list[float]] = {n: [] for n in scales}
    baseline: list[float] = []
    latencies: dict[int, list[float]] = {n: [] for n in scales}
    with tempfile.TemporaryDirectory(prefix="vfu-bench-scale-") as tmp:
        directory = Path(tmp)
        with many_devices_server("gpio", largest, directory) as server:
            paths = [device_socket(directory, i) for i in range(largest)]
            for rep in range(settings.repeats):
                order = list(scales) if rep % 2 == 0 else list(reversed(scales))
                for n in order:
                    agg = run_parallel(paths[:n], settings.seconds)
                    rates[n].append(agg.round_trips_per_s)
                    latencies[n].append(agg.median_us)
                    if n == 1:
                        baseline.append(agg.round_trips_per_s)
                if 1 not in scales:
                    baseline.append(run_parallel(paths[:1], settings.seconds).round_trips_per_s)
            server.check_alive()
    per_connection, server_rss = idle_memory(settings.idle_connections)
    one = median(baseline)
    rows = []
    for n in scales:
        total = median(rates[n])
        p50 = median(latencies[n])
        rows.append(
            Row(
                FIGURE,
                f"scale: {n} device(s) in one process, a C client each",
                f"{rate(total)} aggregate, p50 {p50:.1f} µs per client",
                f"the same server, 1 device: {rate(one)}",
                ratio(total, one),
                None,
            )
        )
    rows.append(
        Row(
            FIGURE,
            f"memory per idle connection ({settings.idle_connections} connections, one process)",
            f"{per_connection:.1f} KiB",
            f"server RSS {server_rss / 1024:.1f} MiB with {settings.idle_connections + 1} devices",
            None,
            MEMORY_TARGET,
            judged=per_connection,
        )
    )
    return rows
