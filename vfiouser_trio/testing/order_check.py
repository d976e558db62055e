"""The spec's ordering rule, checked over a trace: older commands processed before younger replies.

The spec (https://www.qemu.org/docs/master/interop/vfio-user.html, "Command Concurrency")
has the receiver process commands in the order they arrive; a consequence it states is that
an older command (No_reply or not) has been processed before the reply to a younger one is
sent. The wire alone cannot show that for a No_reply command; a :class:`~.tracer.Tracer`
installed on the processing side records when each command's processing ends, so::

    violations = check_order(server_tracer, policy)
    assert not violations, "\\n".join(map(str, violations))

lists every reply that left while an older command on the same link was still unprocessed,
except the pairs the policy's declared :attr:`~vfiouser_trio.ordering.OrderingPolicy.relaxations`
allow. Commands the tracer saw arrive but never saw processed nor answered (dropped, still
queued) count as unprocessed; one answered without being processed (refused by the
connection core) is done with once its error reply leaves, and a message that is neither
command nor reply is no command.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..engine import Link
from ..ordering import OrderingPolicy, Processing, Relaxation, allowed
from ..protocol.errors import command_name
from ..protocol.framing import Frame
from .hooks import Direction
from .tracer import ProcessingRecord, Tracer, TraceRecord

__all__ = ["OrderViolation", "assert_spec_order", "check_order"]


@dataclass(frozen=True, slots=True)
class OrderViolation:
    """``reply`` (to ``younger``) left while the older command ``older`` was unprocessed."""

    older: TraceRecord
    younger: TraceRecord
    reply: TraceRecord

    def __str__(self) -> str:
        return (
            f"{self.reply.link.value} link: the reply to {_name(self.younger)} left"
            f" (+{self.reply.elapsed:.6f}) before the older {_name(self.older)} was processed"
        )


def _name(record: TraceRecord) -> str:
    posted = " (no_reply)" if record.header.no_reply else ""
    return f"{command_name(record.header.command)} id={record.msg_id}{posted}"


def _frame(record: TraceRecord) -> Frame:
    return Frame(record.header, record.payload, [])


def check_order(
    tracer: Tracer, relaxations: OrderingPolicy | Iterable[Relaxation] = ()
) -> list[OrderViolation]:
    """Every breach of the spec's order in ``tracer`` (the processing side's), minus
    ``relaxations`` (a policy's declared ones, or the relaxations themselves)."""
    allowing = tuple(
        relaxations.relaxations if isinstance(relaxations, OrderingPolicy) else relaxations
    )
    # Per link: commands received and not yet processed, in arrival order.
    unprocessed: dict[Link, dict[int, TraceRecord]] = {}
    violations: list[OrderViolation] = []
    for entry in tracer.entries:
        if isinstance(entry, ProcessingRecord):
            if entry.phase is Processing.END and entry.command is not None:
                unprocessed.get(entry.link, {}).pop(entry.command.index, None)
        elif isinstance(entry, TraceRecord):
            if entry.direction is Direction.RECEIVED and entry.header.is_command:
                unprocessed.setdefault(entry.link, {})[entry.index] = entry
            elif entry.direction is Direction.SENT and entry.is_reply:
                younger = entry.request
                if younger is None:
                    continue
                waiting = unprocessed.get(entry.link, {})
                for older in waiting.values():
                    if older.index >= younger.index:
                        break  # dicts keep arrival order: the rest are younger
                    if allowed(allowing, _frame(older), _frame(younger)) is None:
                        violations.append(OrderViolation(older, younger, entry))
                # Answered: done with, even if never processed (refused by the core).
                waiting.pop(younger.index, None)
    return violations


def assert_spec_order(
    tracer: Tracer, relaxations: OrderingPolicy | Iterable[Relaxation] = ()
) -> None:
    """Raise AssertionError listing the violations :func:`check_order` finds."""
    violations = check_order(tracer, relaxations)
    if violations:
        listing = "\n".join(f"  {violation}" for violation in violations)
        raise AssertionError(f"{len(violations)} spec-order violation(s):\n{listing}")
