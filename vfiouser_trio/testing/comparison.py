"""Side-by-side comparison of ordering policies: one workload, one device, each policy in turn.

    result = compare(scenario, {"spec": SpecOrder, "bypass": BypassOrder})
    print(result)                        # a table: latency percentiles per request class
    assert not result["spec"].violations

The workload is an explorer :class:`~vfiouser_trio.testing.explore.Scenario` (a device
factory and a client workload; its ``policy`` is replaced by each one compared). Each policy
gets a fresh device and connection over an in-memory socket pair, run once as the explorer
runs a schedule with no perturbation (:func:`~vfiouser_trio.testing.explore.execute`), so the
same invariants are checked. ``clock="virtual"`` runs on a ``MockClock`` (autojump): device
latencies (``trio.sleep`` in handlers) cost no wall time and results replay exactly;
``clock="real"`` runs on wall time.

Each request the workload sends counts from the moment the client sends it until its reply
arrives or, for a No_reply command, until the server's processing of it ends (the server's
tracer records that). Requests are grouped by ``classify`` (default :func:`request_class`).
Order violations are those :func:`~vfiouser_trio.testing.check_order` finds in the server's
trace: against the spec alone (``violations``: what the policy reorders) and minus the
policy's declared relaxations (``undeclared``: a bug in the policy or its declaration).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import trio

from ..client import Client
from ..ordering import OrderingPolicy, Processing
from ..protocol.constants import Command
from ..protocol.errors import command_name
from .explore import Run, Scenario, execute
from .explore._schedule import Chooser
from .hooks import Direction
from .order_check import OrderViolation, check_order
from .tracer import ProcessingRecord, TraceRecord

__all__ = ["Comparison", "Latencies", "PolicyResult", "compare", "request_class"]

#: Builds the policy to compare (a policy class will do); None means the default, SpecOrder.
PolicyFactory = Callable[[], OrderingPolicy | None]
#: The class a request of the workload is counted in; None leaves it out.
Classify = Callable[[TraceRecord], str | None]
Workload = Callable[[Client, Run], Awaitable[None]]
#: How often the end of a workload's No_reply commands is looked for (seconds; the figures
#: come from the tracers' times, not from this poll). One the server never processes (its
#: core refused it) holds the run until the scenario's ``budget``, which reports a hang.
POLL = 1e-3


def request_class(record: TraceRecord) -> str:
    """The default classes: ``read``, ``write``, ``posted write``, else the command's name."""
    command = record.header.command
    if command == Command.REGION_READ:
        return "read"
    if command == Command.REGION_WRITE:
        return "posted write" if record.header.no_reply else "write"
    return command_name(command)


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest rank (rank = ceil(n * pct / 100)) of sorted samples."""
    rank = max(1, math.ceil(len(ordered) * pct / 100))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Latencies:
    """One request class's latencies under one policy, in seconds (nearest-rank percentiles)."""

    label: str
    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, label: str, samples: Sequence[float]) -> Latencies:
        ordered = sorted(samples)
        return cls(
            label, len(ordered), _percentile(ordered, 50), _percentile(ordered, 99), ordered[-1]
        )


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """What the workload did under one policy."""

    name: str
    policy: OrderingPolicy
    #: Requests of the workload completed (replied to, or processed for No_reply ones).
    completed: int
    #: Seconds (virtual or wall, per the comparison's clock) from the workload's start to end.
    seconds: float
    #: Per request class, in the order the workload first sent each.
    latencies: Mapping[str, Latencies]
    #: Each (older command, younger one) whose reply left before the older was processed
    #: (the spec's rule alone).
    violations: tuple[OrderViolation, ...]
    #: The violations the policy's declared relaxations do not allow.
    undeclared: tuple[OrderViolation, ...]
    #: Every problem the explorer's invariants found in the run (undeclared violations
    #: included; a hang, a failed workload, reads-see-writes over ``memory_regions``).
    problems: tuple[str, ...]

    @property
    def throughput(self) -> float:
        """Completed requests per second."""
        return self.completed / self.seconds if self.seconds > 0 else math.inf

    @property
    def ok(self) -> bool:
        """No problem found: the policy did only what it declares."""
        return not self.problems


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


@dataclass(frozen=True, slots=True)
class Comparison:
    """The results of :func:`compare`, one per policy in the order given; ``str()`` is
    :meth:`table`."""

    clock: Literal["virtual", "real"]
    results: tuple[PolicyResult, ...]

    def __getitem__(self, name: str) -> PolicyResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def __iter__(self) -> Iterator[PolicyResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def table(self) -> str:
        """Latency percentiles per policy and request class, then throughput and order."""
        header = ("policy", "class", "n", "p50", "p99", "max")
        rows: list[tuple[str, ...]] = [header]
        for result in self.results:
            for lat in result.latencies.values():
                rows.append(
                    (
                        result.name,
                        lat.label,
                        str(lat.count),
                        _duration(lat.p50),
                        _duration(lat.p99),
                        _duration(lat.max),
                    )
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        ]
        lines.append("")
        for result in self.results:
            order = f"{len(result.violations)} spec-order violations"
            if result.undeclared:
                order += f", {len(result.undeclared)} NOT DECLARED"
            elif result.violations:
                order += " (all declared)"
            others = len(result.problems) - len(result.undeclared)
            if others > 0:
                order += f", {others} other problems"
            lines.append(
                f"{result.name}: {result.completed} requests in {_duration(result.seconds)}"
                f" ({self.clock} time), {result.throughput:,.0f}/s; {order}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass(slots=True)
class _Window:
    """When the workload ran (the requests sent before it, the handshake, do not count)."""

    start: float = math.inf
    end: float = math.nan
    #: The client tracer's first entry index of the workload (time alone does not tell,
    #: in virtual time the handshake and the workload may share an instant).
    first: int = 0


def _timed(workload: Workload, window: _Window) -> Workload:
    async def timed(client: Client, run: Run) -> None:
        window.start = trio.current_time()
        window.first = len(run.client_tracer.entries)
        await workload(client, run)
        window.end = trio.current_time()
        await _posted_done(run, window.first)

    return timed


async def _posted_done(run: Run, first: int) -> None:
    """Return once the server has processed every No_reply command the workload sent (no
    reply tells when; the times measured are the server's, not this poll's)."""
    posted = sum(
        1
        for entry in run.client_tracer.entries[first:]
        if isinstance(entry, TraceRecord)
        and entry.direction is Direction.SENT
        and entry.header.is_command
        and entry.header.no_reply
    )
    while True:
        ended = sum(
            1
            for entry in run.tracer.entries
            if isinstance(entry, ProcessingRecord)
            and entry.phase is Processing.END
            and entry.header.no_reply
        )
        if ended >= posted:
            return
        await trio.sleep(POLL)


def _ends(run: Run) -> dict[int, deque[float]]:
    """When the server's processing of each command ended, per message ID, in order."""
    ends: dict[int, deque[float]] = defaultdict(deque)
    for entry in run.tracer.entries:
        if isinstance(entry, ProcessingRecord) and entry.phase is Processing.END:
            ends[entry.header.msg_id].append(entry.time)
    return ends


def _measure(
    run: Run, window: _Window, classify: Classify
) -> tuple[int, float, dict[str, Latencies]]:
    """Completed requests, the last completion's time, and latencies per class."""
    ends = _ends(run)
    replied: dict[int, float] = {}  # request record index -> reply arrival
    sent: list[TraceRecord] = []
    for record in run.client_tracer.records:
        if record.direction is Direction.SENT and record.header.is_command:
            if record.index >= window.first:
                sent.append(record)
        elif record.direction is Direction.RECEIVED and record.is_reply and record.request:
            replied[record.request.index] = record.time
    samples: dict[str, list[float]] = {}
    last = window.end
    for record in sent:
        if record.header.no_reply:
            done = ends.get(record.msg_id, deque())
            while done and done[0] < record.time:  # an earlier command's, with this ID
                done.popleft()
            finished = done.popleft() if done else None
        else:
            finished = replied.get(record.index)
        label = classify(record)
        if finished is None or label is None:
            continue
        samples.setdefault(label, []).append(finished - record.time)
        last = max(last, finished)
    completed = sum(len(values) for values in samples.values())
    return (
        completed,
        last,
        {label: Latencies.of(label, values) for label, values in samples.items()},
    )


def _policies(
    policies: Mapping[str, PolicyFactory | OrderingPolicy]
    | Sequence[PolicyFactory | OrderingPolicy],
) -> list[tuple[str | None, PolicyFactory]]:
    items = (
        list(policies.items())
        if isinstance(policies, Mapping)
        else [(None, policy) for policy in policies]
    )
    named: list[tuple[str | None, PolicyFactory]] = []
    for name, policy in items:
        if isinstance(policy, OrderingPolicy):
            named.append((name, lambda policy=policy: policy))  # type: ignore[misc]
        else:
            named.append((name, policy))
    return named


def compare(
    workload: Scenario,
    policies: Mapping[str, PolicyFactory | OrderingPolicy]
    | Sequence[PolicyFactory | OrderingPolicy],
    *,
    clock: Literal["virtual", "real"] = "virtual",
    classify: Classify = request_class,
) -> Comparison:
    """Run ``workload`` under each of ``policies`` and return the results side by side.

    ``policies``: a mapping of names to policy factories (classes) or objects, or a sequence
    of them (each named by its class). ``clock``: ``"virtual"`` (``MockClock``, autojump;
    deterministic) or ``"real"`` (wall time). ``classify`` puts each request of the workload
    in a class (None: not counted). Starts trio runs of its own: call it from a thread in
    async code (``trio.to_thread.run_sync``).
    """
    if clock not in ("virtual", "real"):
        raise ValueError(f"clock must be 'virtual' or 'real', not {clock!r}")
    results: list[PolicyResult] = []
    for name, factory in _policies(policies):
        window = _Window()
        scenario = dataclasses.replace(
            workload, policy=factory, workload=_timed(workload.workload, window)
        )
        run = execute(scenario, Chooser(), virtual_time=clock == "virtual")
        completed, end, latencies = _measure(run, window, classify)
        if math.isnan(end):  # the workload did not finish: up to its last message
            end = _last_message(run)
        results.append(
            PolicyResult(
                name=name if name is not None else type(run.policy).__name__,
                policy=run.policy,
                completed=completed,
                seconds=max(0.0, end - window.start) if window.start != math.inf else 0.0,
                latencies=latencies,
                violations=tuple(check_order(run.tracer)),
                undeclared=tuple(check_order(run.tracer, run.policy)),
                problems=tuple(run.failures),
            )
        )
    return Comparison(clock, tuple(results))


def _last_message(run: Run) -> float:
    """The last time the run's server saw a message (for a workload that did not finish)."""
    times = [record.time for record in run.tracer.records]
    return max(times, default=math.nan)
