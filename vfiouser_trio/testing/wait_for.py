"""A wait-for graph of a hung connection: which side awaits which request, and where it is.

Given the tracers of both sides (each knows the connection it is installed on)::

    print(wait_for_graph(client_tracer, server_tracer))
    # client awaits REGION_WRITE id=17: server is processing it (since +0.000412)
    # server awaits DMA_READ id=0: client has it queued, not started

Each side's requests awaiting a reply come from its connection core
(:meth:`~vfiouser_trio.protocol.connection.ConnectionCore.pending_requests`); where the request
is on the other side (processing, queued, never seen) from the other side's tracer. A side
processing a command while it awaits a request of its own is the usual link of a deadlock
cycle: ``nested_device(..., server_tracer=Tracer())`` gives both tracers, and
``pair.wait_for_graph()`` prints them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..protocol.errors import command_name
from .hooks import Direction
from .tracer import Tracer

__all__ = ["RequestState", "WaitEdge", "WaitForGraph", "wait_for_graph"]


class RequestState(enum.Enum):
    """Where an awaited request is on the side that should answer it."""

    PROCESSING = "is processing it"
    QUEUED = "has it queued, not started"
    ANSWERED = "has answered it (the reply is on its way)"
    UNSEEN = "has not received it"


@dataclass(frozen=True, slots=True)
class WaitEdge:
    """``side`` awaits the reply to ``command`` id ``msg_id`` from ``peer``, which is ``state``."""

    side: str
    command: int
    msg_id: int
    peer: str
    state: RequestState
    #: When the peer started processing it (``PROCESSING`` only), as the peer's ``elapsed``.
    since: float | None = None

    def __str__(self) -> str:
        since = f" (since +{self.since:.6f})" if self.since is not None else ""
        name = command_name(self.command)
        return f"{self.side} awaits {name} id={self.msg_id}: {self.peer} {self.state.value}{since}"


@dataclass(frozen=True, slots=True)
class WaitForGraph:
    """Every request each side awaits, and what each side is processing meanwhile."""

    edges: tuple[WaitEdge, ...]
    #: ``"server is processing REGION_WRITE id=17"`` for each command started, not done.
    processing: tuple[str, ...]

    def __str__(self) -> str:
        lines = [str(edge) for edge in self.edges] + list(self.processing)
        return "\n".join(lines) if lines else "nothing is awaited or being processed"


def _label(tracer: Tracer, position: int) -> str:
    if tracer.label:
        return tracer.label
    return ("client", "server")[position] if position < 2 else f"side {position}"


def wait_for_graph(*tracers: Tracer) -> WaitForGraph:
    """The graph of the sides traced by ``tracers`` (two: the client's and the server's).

    A side whose tracer has seen no message yet (so knows no connection) awaits nothing.
    """
    labels = [_label(tracer, i) for i, tracer in enumerate(tracers)]
    edges: list[WaitEdge] = []
    processing: list[str] = []
    for i, tracer in enumerate(tracers):
        for record in tracer.in_progress():
            name = command_name(record.header.command)
            processing.append(f"{labels[i]} is processing {name} id={record.header.msg_id}")
        if tracer.connection is None or len(tracers) != 2:
            continue
        peer = tracers[1 - i]
        for msg_id, command in tracer.connection.core.pending_requests():
            state, since = _where(peer, msg_id, command)
            edges.append(WaitEdge(labels[i], command, msg_id, labels[1 - i], state, since))
    return WaitForGraph(tuple(edges), tuple(processing))


def _where(peer: Tracer, msg_id: int, command: int) -> tuple[RequestState, float | None]:
    for record in peer.in_progress():
        if record.header.msg_id == msg_id and record.header.command == command:
            return RequestState.PROCESSING, record.elapsed
    for arrived in peer.not_started():
        if arrived.msg_id == msg_id and arrived.header.command == command:
            return RequestState.QUEUED, None
    for received in peer.commands(command, direction=Direction.RECEIVED):
        if received.msg_id == msg_id:
            return RequestState.ANSWERED, None
    return RequestState.UNSEEN, None
