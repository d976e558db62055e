"""Figures 1 and 2: REGION_READ round trips to the gpio example, one at a time and pipelined.

The target is our server in its own process (``python -m vfiouser_trio.cli serve gpio``),
driven by the C load generator: 4-byte reads of BAR2 (region 2) at offset 0. Baselines, in
the same run and alternating with the target: the raw AF_UNIX C ping-pong with messages of
the same sizes (figure 1), and the same load generator against the C echo server (figure 2).
Figure 1 also reports two reference floors (:mod:`bench.figures.floors`): bare Python
responders, blocking and trio, with no framework at all, against the same baseline; our rate
against the bare trio responder's (the engine's fast-path target); and the server CPU time per
round trip, ours against the bare trio responder's (user + system time of the server process
over each one-at-a-time run, warm-up included: less sensitive to a loaded machine than rates).
Figure 2 reports the bare trio responder at ``TARGET_DEPTH`` in flight too (same workload,
against the same C echo server): what Python and trio reach pipelined, with our rate against
it beside.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench.baselines import (
    LatencyResult,
    LoadMode,
    echo_server,
    run_loadgen,
    run_pingpong,
)

from .common import Row, Settings, Target, alternate, median, micros, rate, ratio
from .processes import cli_server, cpu_ticks, floor_server, retry_busy

GPIO_BAR = 2
ACCESS_SIZE = 4
ROUND_TRIP_TARGET = Target.ratio_at_least(0.5)
#: Our one-at-a-time rate against the bare trio responder's (issue 12).
TRIO_FLOOR_TARGET = Target.ratio_at_least(0.8)
_TICK = os.sysconf("SC_CLK_TCK")
PIPELINE_TARGET = Target.ratio_at_least(0.6)
#: The depth whose pipelined rate has a target.
TARGET_DEPTH = 64
#: Reference floors of figure 1: kind -> what it is.
FLOORS = {"blocking": "bare blocking-Python responder", "trio": "bare trio responder"}


@dataclass(frozen=True, slots=True)
class Workload:
    """One load generator setting of figures 1-2."""

    mode: LoadMode
    depth: int = 1
    batch: int = 16

    @property
    def label(self) -> str:
        if self.mode is LoadMode.POSTED:
            return f"{self.batch} No_reply writes + 1 read"
        return f"{self.depth} in flight"


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over repeats of one side of a comparison."""

    round_trips_per_s: float
    messages_per_s: float
    median_us: float
    p99_us: float

    @classmethod
    def of(cls, runs: list[LatencyResult]) -> Summary:
        return cls(
            median([r.round_trips_per_s for r in runs]),
            median([r.messages / r.seconds for r in runs]),
            median([r.median_us for r in runs]),
            median([r.p99_us for r in runs]),
        )

    def describe(self, *, posted: bool = False) -> str:
        if posted:
            head = f"{rate(self.messages_per_s)} msgs ({rate(self.round_trips_per_s)} batches)"
        else:
            head = f"{rate(self.round_trips_per_s)}"
        return f"{head}, p50 {micros(self.median_us)}, p99 {micros(self.p99_us)}"


def measure(settings: Settings) -> list[Row]:
    """Rows of figure 1 (one row) and figure 2 (one per depth, one posted)."""
    workloads = [Workload(LoadMode.READ)]
    workloads += [Workload(LoadMode.PIPELINE, depth=d) for d in settings.depths if d > 1]
    workloads.append(Workload(LoadMode.POSTED, batch=settings.posted_batch))
    ours: dict[Workload, list[LatencyResult]] = {w: [] for w in workloads}
    echo: dict[Workload, list[LatencyResult]] = {w: [] for w in workloads}
    raw: list[LatencyResult] = []
    floors: dict[str, list[LatencyResult]] = {kind: [] for kind in FLOORS}
    #: The bare trio responder at the target depth (figure 2's floor).
    deep_floor: list[LatencyResult] = []
    #: Server CPU µs per round trip, ours and the bare trio floor's, by depth: of each
    #: one-at-a-time run and each run at TARGET_DEPTH.
    cpu: dict[tuple[str, int], list[float]] = {
        (who, depth): [] for who in ("ours", "trio") for depth in (1, TARGET_DEPTH)
    }
    seconds = settings.seconds

    with (
        tempfile.TemporaryDirectory(prefix="vfu-bench-rt-") as tmp,
        cli_server("gpio", Path(tmp) / "gpio.sock") as gpio,
        echo_server() as c_echo,
        floor_server("blocking", Path(tmp) / "blocking.sock"),
        floor_server("trio", Path(tmp) / "trio.sock") as trio_floor,
    ):
        gpio_path = Path(tmp) / "gpio.sock"

        def run(path: Path, w: Workload, region: int) -> LatencyResult:
            return retry_busy(
                lambda: run_loadgen(
                    path,
                    w.mode,
                    depth=w.depth,
                    batch=w.batch,
                    seconds=seconds,
                    region=region,
                    size=ACCESS_SIZE,
                )
            )

        def timed(pid: int, key: str, path: Path, w: Workload) -> LatencyResult:
            before = cpu_ticks(pid)
            result = run(path, w, GPIO_BAR)
            if (key, w.depth) in cpu and w.mode is not LoadMode.POSTED and result.round_trips:
                used = (cpu_ticks(pid) - before) / _TICK
                cpu[key, w.depth].append(used / result.round_trips * 1e6)
            return result

        for rep in range(settings.repeats):
            for w in workloads:
                a, b = alternate(
                    rep,
                    partial(timed, gpio.pid, "ours", gpio_path, w),
                    partial(run, c_echo.path, w, GPIO_BAR),
                )
                ours[w].append(a)
                echo[w].append(b)
                if w.depth == TARGET_DEPTH:
                    deep_floor.append(timed(trio_floor.pid, "trio", Path(tmp) / "trio.sock", w))
                if w.mode is LoadMode.READ:
                    raw.append(run_pingpong(seconds))
                    for kind, runs in floors.items():
                        if kind == "trio":
                            sock = Path(tmp) / "trio.sock"
                            runs.append(timed(trio_floor.pid, "trio", sock, w))
                        else:
                            runs.append(run(Path(tmp) / f"{kind}.sock", w, GPIO_BAR))
            gpio.check_alive()

    rows = []
    read = workloads[0]
    mine, base = Summary.of(ours[read]), Summary.of(raw)
    rows.append(
        Row(
            1,
            "round trip: 4-byte REGION_READ of gpio BAR2, 1 at a time",
            mine.describe(),
            f"raw AF_UNIX C ping-pong {base.describe()}",
            ratio(mine.round_trips_per_s, base.round_trips_per_s),
            ROUND_TRIP_TARGET,
        )
    )
    for kind, label in FLOORS.items():
        floor = Summary.of(floors[kind])
        rows.append(
            Row(
                1,
                f"reference floor: {label}, no framework",
                floor.describe(),
                "the same raw C ping-pong",
                ratio(floor.round_trips_per_s, base.round_trips_per_s),
                None,
            )
        )
    mine, trio = Summary.of(ours[read]), Summary.of(floors["trio"])
    rows.append(
        Row(
            1,
            "round trip against the bare trio responder, 1 at a time",
            mine.describe(),
            f"bare trio responder {trio.describe()}",
            ratio(mine.round_trips_per_s, trio.round_trips_per_s),
            TRIO_FLOOR_TARGET,
        )
    )
    rows.extend(_cpu_row(1, "per round trip, 1 at a time", cpu, 1))
    for w in workloads:
        mine, base = Summary.of(ours[w]), Summary.of(echo[w])
        posted = w.mode is LoadMode.POSTED
        rows.append(
            Row(
                2,
                f"pipelined: {w.label}",
                mine.describe(posted=posted),
                f"C echo server {base.describe(posted=posted)}",
                ratio(mine.round_trips_per_s, base.round_trips_per_s),
                PIPELINE_TARGET if w.depth == TARGET_DEPTH else None,
            )
        )
        if w.depth == TARGET_DEPTH and deep_floor:
            # What Python and trio reach at this depth with no framework: the distance from
            # it to the C echo server is not ours to close.
            floor, deep = Summary.of(deep_floor), Summary.of(ours[w])
            rows.append(
                Row(
                    2,
                    f"reference floor: {FLOORS['trio']}, {w.label}, no framework",
                    floor.describe(),
                    f"the same C echo server {base.describe()}",
                    ratio(floor.round_trips_per_s, base.round_trips_per_s),
                    None,
                )
            )
            rows.append(
                Row(
                    2,
                    f"pipelined against the bare trio responder, {w.label}",
                    deep.describe(),
                    f"bare trio responder {floor.describe()}",
                    ratio(deep.round_trips_per_s, floor.round_trips_per_s),
                    None,
                )
            )
            rows.extend(_cpu_row(2, f"per request, {w.label}", cpu, w.depth))
    return rows


def _cpu_row(
    figure: int, what: str, cpu: dict[tuple[str, int], list[float]], depth: int
) -> list[Row]:
    """The server CPU row at ``depth``: ours against the bare trio responder's (none without
    both measured)."""
    ours, trio = cpu.get(("ours", depth)), cpu.get(("trio", depth))
    if not ours or not trio:
        return []
    ours_cpu, trio_cpu = median(ours), median(trio)
    return [
        Row(
            figure,
            f"server CPU {what} (ratio: bare trio's / ours)",
            f"{micros(ours_cpu)} CPU",
            f"bare trio responder {micros(trio_cpu)} CPU",
            ratio(trio_cpu, ours_cpu),
            None,
        )
    ]
