"""Schedules: the sequence of choices one run made, and the choosers that make them.

A run asks its chooser at every choice point (``choose(label, n)`` -> 0..n-1). Choice 0 is
always "no perturbation" (no delay, no latency, the default batch), so a schedule is the
list of perturbations a run made, and every choice point a schedule does not name is 0.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Choice", "Chooser", "DrawingChooser", "Schedule"]


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice point as a run met it: what it was, how many options, what was chosen."""

    label: str
    options: int
    value: int


@dataclass(frozen=True, slots=True)
class Schedule:
    """The perturbations of a run: (choice point label, value) for every choice not 0.

    Choice points are named, not numbered (``"arrival #7 REGION_READ"``, ``"latency write
    bar1 #2"``: the 2nd call with that label), so a schedule means the same thing when a
    change to one choice moves the others in time. Replay gives every unnamed point 0.
    """

    choices: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, made: Sequence[Choice]) -> Schedule:
        """The schedule of the choices a run made."""
        return cls(tuple((c.label, c.value) for c in made if c.value))

    @classmethod
    def from_dict(cls, choices: Mapping[str, int]) -> Schedule:
        return cls(tuple((label, value) for label, value in choices.items() if value))

    @property
    def perturbations(self) -> int:
        """How many choices are not 0."""
        return len(self.choices)

    def with_value(self, index: int, value: int) -> Schedule:
        """This schedule with its ``index``-th perturbation's value replaced."""
        label = self.choices[index][0]
        return Schedule((*self.choices[:index], (label, value), *self.choices[index + 1 :]))

    def describe(self) -> str:
        """The perturbations, one a line."""
        return "\n".join(f"  {label} = {value}" for label, value in self.choices) or (
            "  (no perturbation)"
        )

    def __str__(self) -> str:
        return f"Schedule.from_dict({dict(self.choices)!r})"


class Chooser:
    """Answers a run's choice points and records them. The base class replays a schedule."""

    def __init__(self, schedule: Schedule | None = None) -> None:
        self.wanted = dict(schedule.choices) if schedule is not None else {}
        #: The choices made so far, in order.
        self.made: list[Choice] = []
        self._seen: dict[str, int] = {}

    def choose(self, label: str, options: int) -> int:
        """A value in ``range(options)`` for the next choice point (1 option: 0, unrecorded).

        A label met again is numbered: the 2nd ``"latency x"`` is ``"latency x #2"``."""
        if options <= 1:
            return 0
        seen = self._seen[label] = self._seen.get(label, 0) + 1
        name = label if seen == 1 else f"{label} #{seen}"
        value = self.pick(len(self.made), name, options)
        self.made.append(Choice(name, options, value))
        return value

    def pick(self, index: int, label: str, options: int) -> int:
        """The value for choice point ``index`` named ``label``; subclasses decide otherwise."""
        return min(self.wanted.get(label, 0), options - 1)


class RandomChooser(Chooser):
    """Perturbs each choice point with probability ``p``, uniformly among the non-0 options."""

    def __init__(self, rng: random.Random, p: float) -> None:
        super().__init__()
        self.rng = rng
        self.p = p

    def pick(self, index: int, label: str, options: int) -> int:
        if self.rng.random() >= self.p:
            return 0
        return self.rng.randrange(1, options)


class PointsChooser(Chooser):
    """Perturbs only the choice points at ``points`` (PCT-style change points), at random."""

    def __init__(self, rng: random.Random, points: Iterable[int]) -> None:
        super().__init__()
        self.rng = rng
        self.points = frozenset(points)

    def pick(self, index: int, label: str, options: int) -> int:
        return self.rng.randrange(1, options) if index in self.points else 0


class DrawingChooser(Chooser):
    """Draws every choice from Hypothesis (``data`` from ``st.data()``), so Hypothesis explores
    and shrinks the choice sequence itself; its shrinking moves values toward 0, "no
    perturbation". Hypothesis is imported only when this is used::

        @given(st.data())
        def test_policy(data):
            run = explore.execute(scenario, explore.DrawingChooser(data))
            assert not run.failures, run.failures
    """

    def __init__(self, data: object) -> None:
        from hypothesis import strategies  # noqa: PLC0415 - an optional dependency

        super().__init__()
        self._draw = getattr(data, "draw")  # noqa: B009 - data's type lives in hypothesis
        self._integers = strategies.integers

    def pick(self, index: int, label: str, options: int) -> int:
        value: int = self._draw(self._integers(0, options - 1), label=label)
        return value
