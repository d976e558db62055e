"""The benchmark: every figure next to its baseline, printed as one markdown table.

    python -m bench [--quick] [--figures 1,2,3,4,5,6,7,8,9] [--repeats N] [--seconds S]

Each figure is a ratio against a baseline measured in the same run (machines are shared and
noisy): target and baseline runs alternate, each is repeated, and medians are reported. The
table says, for each figure with a design target, whether it was met. docs/performance.md
records a full run and explains the figures. ``--quick`` measures every row once and briefly
(a smoke run); its numbers are not worth quoting.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from .figures import backlog, dma, fairness, interrupts, migration, policies, roundtrip, scale
from .figures.common import Row, Settings, format_table
from .figures.machine import Machine, load_average

#: Figure groups in running order: the figure numbers each one reports, and how to measure it.
FIGURES: tuple[tuple[frozenset[int], Callable[[Settings], list[Row]]], ...] = (
    (frozenset({1, 2}), roundtrip.measure),
    (frozenset({3}), dma.measure),
    (frozenset({4}), interrupts.measure),
    (frozenset({5}), scale.measure),
    (frozenset({6}), migration.measure),
    (frozenset({7}), backlog.measure),
    (frozenset({8}), fairness.measure),
    (frozenset({9}), policies.measure),
)
ALL_FIGURES = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9})

LEGEND = """\
Ratios are ours / baseline for rates and bandwidths (higher is better) and for interrupt
latency (figures 4 and 8; lower is better); figure 9's read p99 rows are latency ratios
against SpecOrder (lower is better), its others rate ratios. Figures are medians over the
repeats; "p50"/"p99" are per-run latency percentiles (medians over the repeats)."""


def _figure_set(text: str) -> frozenset[int]:
    try:
        chosen = frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of figure numbers: {text!r}") from None
    if not chosen or not chosen <= ALL_FIGURES:
        raise argparse.ArgumentTypeError(f"figures are numbered 1-{max(ALL_FIGURES)}, got {text!r}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="vfiouser_trio benchmarks against same-run baselines"
    )
    parser.add_argument(
        "--quick", action="store_true", help="every row once, briefly (a smoke run)"
    )
    parser.add_argument(
        "--figures",
        type=_figure_set,
        default=ALL_FIGURES,
        metavar="LIST",
        help="comma-separated figure numbers to run (default: all)",
    )
    parser.add_argument("--repeats", type=int, help="repeats of every measurement")
    parser.add_argument("--seconds", type=float, help="length of one load run, in seconds")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.quick() if args.quick else Settings.full()
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit("--repeats must be positive")
        settings = replace(settings, repeats=args.repeats)
    if args.seconds is not None:
        if not args.seconds > 0:
            raise SystemExit("--seconds must be positive")
        settings = replace(settings, seconds=args.seconds)
    return settings


def run(settings: Settings, figures: frozenset[int], *, progress: bool = True) -> list[Row]:
    """Measure the chosen figures; rows in figure order."""
    rows: list[Row] = []
    for numbers, measure in FIGURES:
        if numbers & figures:
            started = time.monotonic()
            if progress:
                label = ", ".join(str(n) for n in sorted(numbers))
                print(f"measuring figure {label} ...", file=sys.stderr, flush=True)
            rows += [row for row in measure(settings) if row.figure in figures]
            if progress:
                print(f"  done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench`` and ``vfio-user-trio bench``; prints markdown.

    A leading ``--`` is dropped: it is how the options get past a parent command's parser.
    """
    if argv is not None and argv[:1] == ["--"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    machine = Machine.here()
    command = "python -m bench " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    started = time.monotonic()
    rows = run(settings, args.figures)
    elapsed = time.monotonic() - started
    print(f"## vfiouser_trio benchmark ({'quick' if args.quick else 'full'} run)\n")
    print(f"Command: `{command.strip()}`; {settings.repeats} repeat(s), {elapsed:.0f} s.\n")
    print(machine.markdown())
    print(f"- load average at end: {load_average()}")
    print()
    print(format_table(rows))
    print()
    print(LEGEND)
    return 0
