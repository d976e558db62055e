"""One scenario under one schedule: a fresh trio run with virtual time, and what it records.

The device is served by :class:`~vfiouser_trio.server.serve.DeviceServer` over a socket pair
(the engine speaks real sockets; a pair costs about a millisecond per run) and the client
connects with :func:`~vfiouser_trio.client.connect`. Time is a
``trio.testing.MockClock(autojump_threshold=0)``: delays and latencies are virtual, a run takes
the real time of its messages only. The choice points:

* arrival: every message the client sends may be held a chosen time before it reaches the
  server, never overtaking the client's earlier messages
  (:class:`~vfiouser_trio.testing.faults.OrderedDelay`);
* latency: device code awaits ``run.latency(label)``, which sleeps a chosen virtual time;
* batching: before each command the server starts, whether it yields to the rest of the
  process first (a *cut*: ``ConnectionCore.cut_hook``; choice 0 does what
  ``dispatch_batch`` says, 1 the opposite);
* scheduling: trio's scheduler is seeded per run (``Scenario.scheduler_seeds`` choices; by
  default one, as varying it alone rarely finds an ordering bug). This reaches into trio's
  private ``trio._core._run._r``; without it the run is not reproducible and says so.

Both sides are traced (:class:`~vfiouser_trio.testing.tracer.Tracer`, processing start and
end included), for the spec-order invariant and the wait-for graph of a hung run.
"""

from __future__ import annotations

import importlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio
import trio.testing

from ...client import Client, connect
from ...engine import Connection, ConnectionHooks, Forward, Link
from ...limits import DEFAULT_LIMITS
from ...ordering import OrderingPolicy, SpecOrder
from ...protocol.constants import Command
from ...protocol.errors import command_name
from ...protocol.framing import Frame
from ...protocol.header import Header
from ...server.device import Device
from ...server.serve import DeviceServer
from ..faults import OrderedDelay
from ..hooks import Direction, chain
from ..order_check import check_order
from ..tracer import Tracer
from ..wait_for import wait_for_graph
from ._schedule import Chooser

__all__ = ["Event", "Invariant", "Run", "Scenario", "execute", "reads_see_writes", "spec_order"]

log = logging.getLogger(__name__)

#: A check over a finished run: returns the problems it found (empty: the run is fine).
Invariant = Callable[["Run"], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Scenario:
    """What to explore: a device, a client workload and the server's ordering policy.

    ``device(run)`` and ``policy()`` build fresh objects for every run (device code awaits
    ``run.latency(label)`` where a handler may be slow); ``workload(client, run)`` is the
    client's part. ``memory_regions``: the regions whose bytes read back what was last written
    (reads-see-writes is checked there; empty: not checked). ``budget``: virtual seconds the
    workload may take before the run counts as hung.
    """

    device: Callable[[Run], Device]
    workload: Callable[[Client, Run], Awaitable[None]]
    policy: Callable[[], OrderingPolicy | None] = lambda: None
    memory_regions: frozenset[int] = frozenset()
    #: Choices for the hold before each client message reaches the server (0 first).
    arrival_delays: tuple[float, ...] = (0.0, 0.001, 0.005)
    #: Choices for each ``run.latency`` (0 first).
    latencies: tuple[float, ...] = (0.0, 0.002, 0.010)
    #: Whether each command the server starts is a batching choice point (a cut before it).
    cuts: bool = True
    #: How many scheduler seeds to choose from (1: no scheduling choice point).
    scheduler_seeds: int = 1
    invariants: tuple[Invariant, ...] = ()
    budget: float = 10.0


@dataclass(frozen=True, slots=True)
class Event:
    """A message on the server's side of the wire: a command arriving or a reply leaving."""

    time: float
    direction: Direction  # RECEIVED: a command arrived; SENT: a reply (or command) left
    msg_id: int
    command: int
    is_reply: bool
    no_reply: bool
    error: int
    payload: bytes

    def __str__(self) -> str:
        kind = "reply" if self.is_reply else "command"
        posted = " (posted)" if self.no_reply else ""
        return (
            f"{self.time * 1000:8.3f} ms {self.direction.arrow} {kind} {command_name(self.command)}"
            f" id={self.msg_id}{posted}{f' errno={self.error}' if self.error else ''}"
        )


_REGION_ACCESS = struct.Struct("=QII")


@dataclass(slots=True)
class Run:
    """One run in progress and, once done, its record (what invariants look at)."""

    scenario: Scenario
    chooser: Chooser
    #: The server side's messages, in wire order.
    events: list[Event] = field(default_factory=list)
    #: Problems found: the run failed if any.
    failures: list[str] = field(default_factory=list)
    #: Free-form record for user invariants (device or workload notes).
    notes: list[object] = field(default_factory=list)
    #: The server's side: its messages and each command's processing start and end.
    tracer: Tracer = field(default_factory=lambda: Tracer(payload_prefix=64, label="server"))
    #: The client's side.
    client_tracer: Tracer = field(default_factory=lambda: Tracer(payload_prefix=64, label="client"))
    #: The server's ordering policy in this run (what the spec-order check allows).
    policy: OrderingPolicy = field(default_factory=SpecOrder)

    def choose(self, label: str, options: int) -> int:
        """Ask the schedule (0..options-1)."""
        return self.chooser.choose(label, options)

    async def latency(self, label: str) -> None:
        """A handler latency choice point: sleep the chosen (virtual) time."""
        delays = self.scenario.latencies
        seconds = delays[self.choose(f"latency {label}", len(delays))]
        if seconds:
            await trio.sleep(seconds)
        else:
            await trio.lowlevel.checkpoint()

    def waits(self) -> str:
        """Who awaits what: the wait-for graph of both sides (see :func:`..wait_for_graph`)."""
        return str(wait_for_graph(self.client_tracer, self.tracer))


class _Recorder(ConnectionHooks):
    """Server-side hook: records every message crossing the server's socket, and makes the
    server's cuts between commands choice points (``Scenario.cuts``)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def _cut(self, started: int, header: Header) -> bool:
        """Whether the server yields before starting the command ``header``: 0 keeps the
        default (every ``dispatch_batch`` commands), 1 does the opposite."""
        default = started >= DEFAULT_LIMITS.dispatch_batch
        label = f"cut before {command_name(header.command)} id={header.msg_id}"
        return default != bool(self.run.choose(label, 2))

    def _note(self, direction: Direction, conn: Connection, frame: Frame) -> None:
        h = frame.header
        self.run.events.append(
            Event(
                trio.current_time(),
                direction,
                h.msg_id,
                h.command,
                h.is_reply,
                h.no_reply,
                h.error if h.is_reply else 0,
                bytes(frame.payload),
            )
        )

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self._note(Direction.SENT, conn, frame)
        forward(frame)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        if self.run.scenario.cuts and conn.core.cut_hook is None:
            conn.core.cut_hook = self._cut  # before the first command (VERSION) runs
        self._note(Direction.RECEIVED, conn, frame)
        forward(frame)


def _seed_scheduler(seed: int) -> bool:
    """Seed trio's scheduler (a private attribute); False if this trio has none."""
    rng = getattr(importlib.import_module("trio._core._run"), "_r", None)
    if rng is None or not hasattr(rng, "seed"):
        return False
    rng.seed(seed)
    return True


def execute(scenario: Scenario, chooser: Chooser, *, virtual_time: bool = True) -> Run:
    """Run the scenario once under ``chooser``; the run's record (``run.failures``).

    ``virtual_time=False`` runs on trio's real clock (latencies then cost wall time), as
    :func:`vfiouser_trio.testing.compare` does for ``clock="real"``."""
    run = Run(scenario, chooser)
    seed = run.choose("scheduler seed", scenario.scheduler_seeds)
    if not _seed_scheduler(seed):
        log.warning("trio's scheduler cannot be seeded: runs may not replay exactly")
    if virtual_time:
        trio.run(_main, run, clock=trio.testing.MockClock(autojump_threshold=0))
    else:
        trio.run(_main, run)
    if not run.failures:  # a run that hung or raised is not checked further
        for invariant in (spec_order, reads_see_writes, *scenario.invariants):
            run.failures.extend(invariant(run))
    return run


async def _main(run: Run) -> None:
    scenario = run.scenario
    device = scenario.device(run)
    policy = scenario.policy()
    run.policy = policy if policy is not None else SpecOrder()
    server = DeviceServer(
        device,
        offer_twin_socket=False,
        policy=run.policy,
        hooks=chain(_Recorder(run), run.tracer),
    )
    delays = scenario.arrival_delays

    def arrival(frame: Frame, match: int) -> float:
        label = f"arrival #{match} {command_name(frame.header.command)}"
        return delays[run.choose(label, len(delays))]

    delay = OrderedDelay(seconds=arrival, direction=Direction.SENT)
    client_sock, server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, server_sock)
        nursery.start_soon(device.run)
        try:
            hooks = chain(delay, run.client_tracer)
            async with connect(client_sock, twin_socket=False, hooks=hooks) as client:
                await _workload(run, client)
        except Exception as exc:
            run.failures.append(f"the connection failed: {type(exc).__name__}: {exc}")
        finally:
            delay.close()
            nursery.cancel_scope.cancel()


async def _workload(run: Run, client: Client) -> None:
    """Run the workload; past the budget, note the wait-for graph (before cancelling the
    workload withdraws its requests) and stop it."""
    budget = run.scenario.budget
    async with trio.open_nursery() as nursery:

        async def watchdog() -> None:
            await trio.sleep(budget)
            graph = "\n".join(f"  {line}" for line in run.waits().splitlines())
            run.failures.append(
                f"hang: the workload did not finish within {budget} s (virtual):\n{graph}"
            )
            nursery.cancel_scope.cancel()

        nursery.start_soon(watchdog)
        try:
            await run.scenario.workload(client, run)
        except Exception as exc:  # reported as the run's failure
            run.failures.append(f"the workload raised {type(exc).__name__}: {exc}")
        nursery.cancel_scope.cancel()


def spec_order(run: Run) -> list[str]:
    """The spec's ordering rule (Command Concurrency) on the server's trace, minus the
    relaxations the run's policy declares (see :func:`..order_check.check_order`)."""
    return [f"spec order: {violation}" for violation in check_order(run.tracer, run.policy)]


def reads_see_writes(run: Run) -> list[str]:
    """Each REGION_READ of a memory region returns, byte for byte, the data of the last
    REGION_WRITE covering that byte that arrived before the read (bytes no write covered
    are not checked). Arrival order is the client's send order, the order the spec
    processes commands in (Command Concurrency)."""
    regions = run.scenario.memory_regions
    if not regions:
        return []
    memory: dict[tuple[int, int], tuple[int, int]] = {}  # (region, address) -> (byte, writer)
    expected: dict[int, tuple[int, int, list[tuple[int, int] | None]]] = {}
    problems = []
    for event in run.events:
        if event.command not in (Command.REGION_READ, Command.REGION_WRITE):
            continue
        if event.direction is Direction.RECEIVED and not event.is_reply:
            if len(event.payload) < _REGION_ACCESS.size:
                continue
            offset, region, count = _REGION_ACCESS.unpack_from(event.payload)
            if region not in regions:
                continue
            if event.command == Command.REGION_WRITE:
                data = event.payload[_REGION_ACCESS.size :]
                for i, byte in enumerate(data[:count]):
                    memory[(region, offset + i)] = (byte, event.msg_id)
            else:
                seen = [memory.get((region, offset + i)) for i in range(count)]
                expected[event.msg_id] = (region, offset, seen)
        elif event.is_reply and event.command == Command.REGION_READ and not event.error:
            entry = expected.pop(event.msg_id, None)
            if entry is None:
                continue
            region, offset, seen = entry
            got = event.payload[_REGION_ACCESS.size :]
            for i, want in enumerate(seen):
                if want is not None and i < len(got) and got[i] != want[0]:
                    problems.append(
                        f"reads-see-writes: REGION_READ id={event.msg_id} of region {region} at"
                        f" {offset:#x} returned {got.hex()}; byte {i} should be {want[0]:#04x},"
                        f" written by REGION_WRITE id={want[1]} which arrived before the read"
                    )
                    break
    return problems
