"""Figure 8: fairness, another device's latency while one connection pipelines big reads.

One server process (``python -m bench.devices serve bench.devices:DmaBenchDevice --count
2``) serves two devices whose 4 KiB BAR0 reads as zeros at once (the cost is the server's,
not a device callback's). The probe is the C load generator on device 1: 4-byte
REGION_READs of BAR0, one at a time, for one load run (``--seconds``); its p99 is the
figure. Idle, nothing else runs. Loaded, a hog client on device 0 pipelines bursts of 8,000
REGION_READs of the whole 4 KiB BAR0 on its one connection (all 8,000 written at once,
then all 8,000 replies read, again and again) for the whole of the probe's run; the bursts
of every loaded run share one connection. The ratio
is loaded p99 / idle p99, both measured in the same repeat, in alternating order.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.baselines import LoadgenResult, LoadMode, run_loadgen

from .common import BenchError, Row, Settings, Target, alternate, median, micros, ratio
from .processes import device_socket, many_devices_server, retry_busy
from .wire import READ_REPLY_HEAD, connect, read_exactly, read_once, region_reads

FIGURE = 8
#: A bench device whose 4 KiB BAR0 reads as zeros at once (bench/devices.py): the cost is
#: the server's, not a device callback's.
DEVICE = "bench.devices:DmaBenchDevice"
BURST = 8000
READ_SIZE = 4096
BAR = 0
TARGET = Target.ratio_at_most(3)
#: Unmeasured probe round trips before each probe run.
PROBE_WARMUP = 10
#: At most this many repeats: a loaded run lasts at least one burst (seconds while unfair).
MAX_REPEATS = 3


@dataclass(frozen=True, slots=True)
class Run:
    p99_us: float
    p50_us: float


class Hog:
    """A client pipelining bursts of :data:`BURST` 4 KiB reads on its one connection.

    One connection serves every loaded run of the figure: ``with hog.bursting():`` keeps
    bursts going for the body of the block (the burst in progress finishes on exit).
    """

    def __init__(self, path: Path) -> None:
        self.sock = connect(path, timeout=60.0)
        read_once(self.sock, BAR, 0, READ_SIZE)
        self.bursts = 0
        self._requests = region_reads(BURST, BAR, 0, READ_SIZE)

    def _burst(self) -> None:
        writer = threading.Thread(target=self.sock.sendall, args=(self._requests,))
        writer.start()
        replies = BURST * (READ_REPLY_HEAD + READ_SIZE)
        got = 0
        while got < replies:
            got += len(read_exactly(self.sock, min(1 << 20, replies - got)))
        writer.join()
        self.bursts += 1

    @contextmanager
    def bursting(self) -> Iterator[None]:
        stop = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                while not stop.is_set():
                    self._burst()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name="fairness-hog")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if errors:
            raise BenchError(f"the hog client failed: {errors[0]!r}") from errors[0]

    def close(self) -> None:
        self.sock.close()


def probe(path: Path, settings: Settings) -> LoadgenResult:
    """One probe run; a short warm-up, since a starved probe waits out whole bursts."""
    return retry_busy(
        lambda: run_loadgen(
            path, LoadMode.READ, seconds=settings.seconds, region=BAR, size=4, warmup=PROBE_WARMUP
        )
    )


def measure(settings: Settings) -> list[Row]:
    """Figure 8's row: the probe's p99, loaded over idle."""
    idle: list[LoadgenResult] = []
    loaded: list[LoadgenResult] = []
    bursts: list[int] = []
    with tempfile.TemporaryDirectory(prefix="vfu-bench-fair-") as tmp:
        directory = Path(tmp)
        with many_devices_server(DEVICE, 2, directory) as server:
            hog_path, probe_path = device_socket(directory, 0), device_socket(directory, 1)

            hog = Hog(hog_path)
            try:

                def under_load() -> LoadgenResult:
                    before = hog.bursts
                    with hog.bursting():
                        result = probe(probe_path, settings)
                    bursts.append(hog.bursts - before)
                    return result

                for rep in range(min(settings.repeats, MAX_REPEATS)):
                    quiet, busy = alternate(rep, lambda: probe(probe_path, settings), under_load)
                    idle.append(quiet)
                    loaded.append(busy)
                    server.check_alive()
            finally:
                hog.close()
    idle_p99 = median([r.p99_us for r in idle])
    loaded_p99 = median([r.p99_us for r in loaded])
    return [
        Row(
            FIGURE,
            f"fairness: another device's 4-byte REGION_READ while one connection pipelines "
            f"{BURST:,} 4 KiB reads",
            f"p50 {micros(median([r.median_us for r in loaded]))}, p99 {micros(loaded_p99)} "
            f"({median([float(b) for b in bursts]):.0f} bursts of {BURST:,} per run)",
            f"the same device idle: p50 {micros(median([r.median_us for r in idle]))}, "
            f"p99 {micros(idle_p99)}",
            ratio(loaded_p99, idle_p99),
            TARGET,
        )
    ]
