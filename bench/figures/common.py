"""What every figure shares: run settings, result rows with their targets, and formatting."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: Placeholder of an empty cell.
NONE = "—"


class BenchError(RuntimeError):
    """A figure could not be measured (a server died, a peer failed, a tool broke)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how often each figure measures."""

    #: Times each measurement is taken; target and baseline runs alternate between repeats.
    repeats: int
    #: Length of one load generator / ping-pong run, in seconds.
    seconds: float
    #: Length of one copy measurement (one size, one method), in seconds.
    copy_seconds: float
    #: DMA transfer sizes of figure 3.
    dma_sizes: tuple[int, ...]
    #: Device counts of figure 5.
    scales: tuple[int, ...]
    #: Idle connections (one per device, one server process) of figure 5's memory row.
    idle_connections: int = 1000
    #: Requests in flight of figure 2 (besides the posted batch).
    depths: tuple[int, ...] = (1, 8, 64)
    #: No_reply writes per read in figure 2's posted mode.
    posted_batch: int = 16

    @classmethod
    def full(cls) -> Settings:
        return cls(
            repeats=7,
            seconds=1.0,
            copy_seconds=0.1,
            dma_sizes=(4096, 16384, 65536, 262144, 1048576),
            scales=(1, 10, 100),
        )

    @classmethod
    def quick(cls) -> Settings:
        """A smoke run: every figure and row, each measured once and briefly."""
        return cls(
            repeats=1,
            seconds=0.2,
            copy_seconds=0.02,
            dma_sizes=(4096, 65536),
            scales=(1, 4),
            idle_connections=20,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """A design target: the judged value must be at least (or at most) ``limit``."""

    limit: float
    at_least: bool
    #: How the limit reads in the table, e.g. "≥ 0.5x" or "≤ 64 KiB".
    label: str

    @classmethod
    def ratio_at_least(cls, limit: float) -> Target:
        return cls(limit, True, f"≥ {limit:g}x")

    @classmethod
    def ratio_at_most(cls, limit: float) -> Target:
        return cls(limit, False, f"≤ {limit:g}x")

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table."""

    figure: int
    case: str
    ours: str
    baseline: str
    #: ours / baseline (a rate ratio, or a latency ratio for figure 4); None when not a ratio.
    ratio: float | None = None
    target: Target | None = None
    #: The value the target judges (the ratio unless said otherwise).
    judged: float | None = None

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.judged if self.judged is not None else self.ratio
        return None if value is None else self.target.met(value)


COLUMNS = ("#", "case", "ours", "baseline", "ratio", "target", "met")


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table with the columns of :data:`COLUMNS`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        met = row.met
        cells = (
            str(row.figure),
            row.case,
            row.ours,
            row.baseline,
            NONE if row.ratio is None else f"{row.ratio:.2f}",
            NONE if row.target is None else row.target.label,
            NONE if met is None else ("yes" if met else "**no**"),
        )
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("no measurements to take the median of")
    return statistics.median(values)


def ratio(ours: float, baseline: float) -> float:
    return ours / baseline if baseline > 0 else float("nan")


def rate(value: float) -> str:
    """A per-second rate, e.g. "17.5k/s"."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M/s"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k/s"
    return f"{value:.0f}/s"


def micros(value: float) -> str:
    return f"{value:.1f} µs" if value < 1000 else f"{value / 1000:.2f} ms"


def bandwidth(mb_per_s: float) -> str:
    """10^6 B/s as GB/s or MB/s."""
    return f"{mb_per_s / 1000:.2f} GB/s" if mb_per_s >= 1000 else f"{mb_per_s:.0f} MB/s"


def size_label(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1 << 10 and size % (1 << 10) == 0:
        return f"{size >> 10} KiB"
    return f"{size} B"


def alternate(rep: int, first: Callable[[], T], second: Callable[[], T]) -> tuple[T, T]:
    """Run both, ``first`` first on even repeats and ``second`` first on odd ones, so neither
    side always runs on a cold (or a warm) machine; returns (first's, second's) results."""
    if rep % 2 == 0:
        a = first()
        return a, second()
    b = second()
    return first(), b
