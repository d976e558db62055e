"""Interrupts as the client sees them: one eventfd per enabled vector, awaitable.

``Client.enable_irqs`` creates the eventfds and hands copies to the server with SET_IRQS
(TRIGGER, DATA_EVENTFD); the server signals one to raise that vector. The client keeps
ownership of its eventfds here and closes them when the vectors are disabled, replaced, or
the client exits (a task waiting on one then gets ``trio.ClosedResourceError``; an
``async for`` over an :class:`Interrupt` simply ends).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Self

import trio

from ..eventfd import EventFd

__all__ = ["Interrupt", "InterruptTable"]


class Interrupt:
    """Vector ``vector`` of IRQ index ``index``, delivered through ``eventfd``.

    ``await irq.wait()`` returns how many triggers were coalesced since the last wait;
    ``async for count in irq`` does the same in a loop until the interrupt is disabled.
    """

    def __init__(self, index: int, vector: int, eventfd: EventFd) -> None:
        self.index = index
        self.vector = vector
        self.eventfd = eventfd

    @property
    def closed(self) -> bool:
        return self.eventfd.closed

    async def wait(self) -> int:
        """Wait for the interrupt; returns the number of triggers consumed."""
        return await self.eventfd.wait()

    def try_read(self) -> int | None:
        """Consume pending triggers without waiting; None if there are none."""
        return self.eventfd.try_read()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> int:
        try:
            return await self.wait()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self.eventfd.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Interrupt index={self.index} vector={self.vector} {state}>"


class InterruptTable:
    """The client's trigger eventfds, by (IRQ index, vector)."""

    def __init__(self) -> None:
        self._irqs: dict[tuple[int, int], Interrupt] = {}

    def get(self, index: int, vector: int) -> Interrupt:
        """The enabled interrupt; LookupError if that vector has no eventfd of ours."""
        try:
            return self._irqs[index, vector]
        except KeyError:
            raise LookupError(f"IRQ {index} vector {vector} is not enabled") from None

    def enabled(self, index: int) -> list[Interrupt]:
        """The enabled vectors of ``index``, in vector order."""
        return sorted((i for (x, _), i in self._irqs.items() if x == index), key=_vector)

    def install(self, interrupts: Iterable[Interrupt]) -> None:
        """Record newly assigned interrupts, closing the ones they replace."""
        for irq in interrupts:
            old = self._irqs.pop((irq.index, irq.vector), None)
            if old is not None and old is not irq:
                old.close()
            self._irqs[irq.index, irq.vector] = irq

    def drop(self, index: int, vectors: Iterable[int] | None = None) -> None:
        """Close and forget the eventfds of ``vectors`` (default: all) of ``index``."""
        wanted = None if vectors is None else set(vectors)
        keys = [k for k in self._irqs if k[0] == index and (wanted is None or k[1] in wanted)]
        for key in keys:
            self._irqs.pop(key).close()

    def close(self) -> None:
        irqs, self._irqs = self._irqs, {}
        for irq in irqs.values():
            irq.close()


def _vector(irq: Interrupt) -> int:
    return irq.vector
