"""Strategies that pick schedules, the explorer loop, shrinking and the failure report."""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ..faults import OrderedDelay
from ..hooks import Direction
from ._run import Run, Scenario, execute
from ._schedule import Chooser, PointsChooser, RandomChooser, Schedule

__all__ = [
    "PCT",
    "Exhaustive",
    "Failure",
    "Random",
    "Report",
    "Strategy",
    "explore",
    "replay",
    "shrink",
]


#: The label of an arrival choice point (see _run): the client's n-th message.
_ARRIVAL = re.compile(r"arrival #(\d+) \S+")


class Strategy:
    """Yields choosers, one per run; told each finished run (to adapt, if it wants)."""

    def choosers(self) -> Iterator[Chooser]:
        raise NotImplementedError

    def observe(self, run: Run) -> None:
        """The run made with the last chooser yielded is done."""


@dataclass
class Random(Strategy):
    """Each choice point perturbed with probability ``p``, from a generator seeded ``seed``."""

    seed: int = 0
    p: float = 0.2

    def choosers(self) -> Iterator[Chooser]:
        rng = random.Random(self.seed)
        while True:
            yield RandomChooser(random.Random(rng.getrandbits(64)), self.p)


@dataclass
class PCT(Strategy):
    """PCT-style (probabilistic concurrency testing, Burckhardt et al. 2010): a bug of depth
    ``depth`` needs few well-placed perturbations, so each run perturbs ``depth`` choice
    points picked at random among those the previous runs reached, and nothing else."""

    seed: int = 0
    depth: int = 2
    _length: int = field(default=1, init=False, repr=False)

    def choosers(self) -> Iterator[Chooser]:
        rng = random.Random(self.seed)
        while True:
            count = min(self.depth, self._length)
            yield PointsChooser(
                random.Random(rng.getrandbits(64)), rng.sample(range(self._length), count)
            )

    def observe(self, run: Run) -> None:
        self._length = max(self._length, len(run.chooser.made))


@dataclass
class Exhaustive(Strategy):
    """Every schedule with at most ``bound`` perturbations, breadth first (fewest first).

    Starts from the unperturbed run; a run's choice points after its last perturbation are
    each extended with every non-0 value, so choice points that a perturbation creates (a
    later message, a new latency) are reached too.
    """

    bound: int = 2

    def __post_init__(self) -> None:
        self._frontier: deque[Schedule] = deque([Schedule()])
        self._queued: set[Schedule] = {Schedule()}
        self._last = Schedule()

    def choosers(self) -> Iterator[Chooser]:
        while self._frontier:
            self._last = self._frontier.popleft()
            yield Chooser(self._last)

    def observe(self, run: Run) -> None:
        prefix = self._last
        if prefix.perturbations >= self.bound:
            return
        made = run.chooser.made
        start = max((i + 1 for i, c in enumerate(made) if c.value), default=0)
        for choice in made[start:]:
            for value in range(1, choice.options):
                schedule = Schedule((*prefix.choices, (choice.label, value)))
                if schedule not in self._queued:
                    self._queued.add(schedule)
                    self._frontier.append(schedule)


@dataclass
class Failure:
    """A failing schedule (shrunk), what failed, and the original one."""

    schedule: Schedule
    problems: list[str]
    original: Schedule
    run: Run

    def regression_test(
        self, name: str = "test_explored_schedule", scenario: str = "SCENARIO"
    ) -> str:
        """The text of a pytest test replaying this schedule against ``scenario`` (an
        expression naming the Scenario) and asserting it no longer fails."""
        lines = [
            f"def {name}() -> None:",
            "    # Found by vfiouser_trio.testing.explore; it failed with:",
            *(f"    #   {line}" for p in self.problems[:3] for line in p.splitlines()),
            *(f"    # {line.strip()}" for line in self.schedule.describe().splitlines()),
            *(f"    # {line}" for line in self._fault_note()),
            f"    schedule = explore.Schedule.from_dict({dict(self.schedule.choices)!r})",
            f"    run = explore.replay({scenario}, schedule)",
            "    assert not run.failures, run.failures",
        ]
        return "\n".join(lines) + "\n"

    def arrival_fault(self) -> OrderedDelay | None:
        """The schedule's arrival delays as the framework's fault, for the client's side of
        a :func:`~vfiouser_trio.testing.nested_device` serving the same device and workload
        (``faults=``, ``twin_socket=False`` as the explorer runs): the n-th message the client
        sends is held as the schedule held it.
        None when the schedule delays no message. Latencies and batching are not faults."""
        seconds = self._arrival_seconds()
        return OrderedDelay(seconds=seconds, direction=Direction.SENT) if seconds else None

    def _arrival_seconds(self) -> dict[int, float]:
        delays = self.run.scenario.arrival_delays
        seconds = {}
        for label, value in self.schedule.choices:
            match = _ARRIVAL.fullmatch(label)
            if match is not None:
                seconds[int(match.group(1))] = delays[value]
        return seconds

    def _fault_note(self) -> list[str]:
        seconds = self._arrival_seconds()
        if not seconds:
            return []
        return [
            "The same arrival timing on a nested device's client (twin_socket=False):",
            f"  faults=OrderedDelay(seconds={seconds!r}, direction=Direction.SENT)",
        ]

    def __str__(self) -> str:
        problems = "\n".join(self.problems)
        return (
            f"{problems}\nschedule {self.schedule} ({self.schedule.perturbations} perturbations,"
            f" shrunk from {self.original.perturbations}):\n{self.schedule.describe()}"
        )


@dataclass
class Report:
    """What an exploration found: runs made, how many failed, the first failure shrunk."""

    runs: int = 0
    failed: int = 0
    distinct: int = 0
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def __str__(self) -> str:
        head = f"{self.runs} runs ({self.distinct} distinct schedules), {self.failed} failed"
        return head if self.failure is None else f"{head}; first failure:\n{self.failure}"


def replay(scenario: Scenario, schedule: Schedule | Mapping[str, int]) -> Run:
    """Run ``scenario`` once under ``schedule``; the run (``run.failures`` empty: it passed)."""
    if not isinstance(schedule, Schedule):
        schedule = Schedule.from_dict(schedule)
    return execute(scenario, Chooser(schedule))


def shrink(scenario: Scenario, schedule: Schedule, *, max_runs: int = 200) -> tuple[Schedule, Run]:
    """A locally minimal failing schedule, delta-debugging style: each perturbation alone,
    then the schedule less a chunk of its perturbations (halves, quarters... single ones),
    then values lowered; the first that still fails is kept and the search starts again,
    until nothing smaller fails (or ``max_runs`` replays). Dropping a choice can move the
    others in time, so the result is a local minimum, not the smallest schedule."""
    run = replay(scenario, schedule)
    if not run.failures:
        raise ValueError(f"{schedule} does not fail: nothing to shrink")
    best, best_run = Schedule.of(run.chooser.made), run
    runs = 0

    def candidates(current: Schedule) -> Iterator[Schedule]:
        choices = current.choices
        if len(choices) > 1:
            for choice in choices:  # one perturbation may be the whole story
                yield Schedule((choice,))
        size = len(choices) // 2  # then drop chunks, halves first (delta debugging)
        while size >= 1:
            for start in reversed(range(0, len(choices), size)):
                yield Schedule(choices[:start] + choices[start + size :])
            size //= 2
        for index, (_, value) in enumerate(choices):
            for lower in range(1, value):
                yield current.with_value(index, lower)

    changed = True
    while changed and runs < max_runs:
        changed = False
        for candidate in candidates(best):
            runs += 1
            trial = replay(scenario, candidate)
            if trial.failures:
                best, best_run, changed = Schedule.of(trial.chooser.made), trial, True
                break
            if runs >= max_runs:
                break
    return best, best_run


def explore(
    scenario: Scenario,
    strategy: Strategy | None = None,
    *,
    runs: int = 200,
    stop_at_first: bool = True,
) -> Report:
    """Run ``scenario`` under up to ``runs`` schedules of ``strategy`` (Random() by default).

    The first failing schedule is shrunk (:func:`shrink`) into ``report.failure``; with
    ``stop_at_first`` False the remaining runs still count failures (``report.failed``).
    """
    strategy = strategy if strategy is not None else Random()
    report = Report()
    seen: set[Schedule] = set()
    first: Run | None = None
    for chooser in strategy.choosers():
        if report.runs >= runs:
            break
        run = execute(scenario, chooser)
        strategy.observe(run)
        report.runs += 1
        seen.add(Schedule.of(run.chooser.made))
        if run.failures:
            report.failed += 1
            if first is None:
                first = run
            if stop_at_first:
                break
    report.distinct = len(seen)
    if first is not None:
        original = Schedule.of(first.chooser.made)
        schedule, shrunk = shrink(scenario, original)
        report.failure = Failure(schedule, list(shrunk.failures), original, shrunk)
    return report
