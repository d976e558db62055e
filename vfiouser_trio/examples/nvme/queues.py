"""Submission and completion queues: rings in guest memory, doorbells, phase tags.

The host owns a submission queue's tail (it writes the SQ tail doorbell) and the
controller its head; for a completion queue the controller owns the tail and the host
the head (CQ head doorbell). A completion entry carries the phase tag, which flips
each time the controller wraps the queue (NVMe 1.4, section 4.6 "Completion Queue
Entry"), and the SQ head, which tells the host which entries it may reuse.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import trio

from .spec import CQE, CQE_SIZE, SQE_SIZE


def _event() -> trio.Event:
    return trio.Event()


@dataclass(eq=False)
class CompletionQueue:
    """A completion queue: ``size`` entries at ``base``, interrupt ``vector`` if enabled."""

    qid: int
    base: int
    size: int
    vector: int
    interrupts: bool
    head: int = 0
    tail: int = 0
    phase: int = 1
    #: The submission queues posting here (a CQ cannot be deleted while any remain).
    sqs: set[int] = field(default_factory=set)
    #: Completions not yet posted (the queue is full, or the device stopped): (result,
    #: SQ head, SQ id, command id, status). At most ``size``: submission queues wait.
    pending: deque[tuple[int, int, int, int, int]] = field(default_factory=deque)
    lock: trio.Lock = field(default_factory=trio.Lock)
    _moved: trio.Event = field(default_factory=_event)

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    @property
    def outstanding(self) -> bool:
        """Entries posted that the host has not yet consumed (the CQ head is behind)."""
        return self.head != self.tail

    def entry(self, result: int, sq_head: int, sqid: int, cid: int, status: int) -> bytes:
        """The next entry, phase tag included."""
        return CQE.pack(result, 0, sq_head, sqid, cid, (status << 1) | self.phase)

    def advance(self) -> None:
        self.tail = (self.tail + 1) % self.size
        if self.tail == 0:
            self.phase ^= 1

    def set_head(self, head: int) -> None:
        self.head = head
        self.notify()

    def notify(self) -> None:
        """The head moved or pending completions were posted: wake who waits for room."""
        self._moved.set()
        self._moved = trio.Event()

    async def wait_for_room(self) -> None:
        """Until the host consumes an entry (its CQ head doorbell) or completions post."""
        await self._moved.wait()

    @property
    def backlogged(self) -> bool:
        """As many completions wait as the queue holds: its SQs fetch nothing more."""
        return len(self.pending) >= self.size

    def slot(self, index: int) -> int:
        return self.base + index * CQE_SIZE


@dataclass(eq=False)
class SubmissionQueue:
    """A submission queue: ``size`` entries at ``base``, completing to ``cq``."""

    qid: int
    base: int
    size: int
    cq: CompletionQueue
    head: int = 0
    tail: int = 0
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: A shadow tail beyond the queue was reported (once).
    bad_shadow: bool = False
    _rung: trio.Event = field(default_factory=_event)

    @property
    def empty(self) -> bool:
        return self.head == self.tail

    def set_tail(self, tail: int) -> None:
        self.tail = tail
        self._rung.set()

    async def wait_rung(self) -> None:
        """Until the host writes this queue's tail doorbell (at once if it did already)."""
        await self._rung.wait()
        self._rung = trio.Event()

    def take(self) -> int:
        """The guest address of the entry at the head; the head moves on."""
        address = self.base + self.head * SQE_SIZE
        self.head = (self.head + 1) % self.size
        return address
