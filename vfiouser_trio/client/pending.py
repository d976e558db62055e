"""Requests sent now and answered later: what ``Client.start_read`` / ``start_write`` return."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, Generic, TypeVar

from ..engine import PendingReply
from ..protocol.framing import Frame

__all__ = ["PendingResult"]

T = TypeVar("T")


class PendingResult(Generic[T]):
    """The replies to requests already sent (one per piece of a split access).

    ``await pending`` (or ``await pending.result()``) waits for them in order and gives the
    access's result, raising what the blocking call would have raised; once only. A pending
    result that will not be awaited must be :meth:`cancel`-led: its message IDs stay in use
    until then.
    """

    __slots__ = ("_finish", "_on_error", "_replies")

    def __init__(
        self,
        replies: Sequence[PendingReply],
        finish: Callable[[list[Frame]], T],
        *,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._replies = list(replies)
        self._finish = finish
        self._on_error = on_error

    @classmethod
    def ready(cls, value: T) -> PendingResult[T]:
        """A result known at once (an access served from shared memory)."""
        return cls((), lambda frames: value)

    @property
    def done(self) -> bool:
        """True once every reply has come (awaiting then does not wait)."""
        return all(reply.done for reply in self._replies)

    async def result(self) -> T:
        frames: list[Frame] = []
        try:
            for reply in self._replies:
                frames.append(await reply.wait())
            return self._finish(frames)
        except BaseException as exc:
            self.cancel()
            if self._on_error is not None:
                self._on_error(exc)
            raise
        finally:
            for frame in frames:
                frame.close_fds()

    def __await__(self) -> Generator[Any, Any, T]:
        return self.result().__await__()

    def cancel(self) -> None:
        """Give up the replies not yet taken (late ones are consumed when they come)."""
        for reply in self._replies:
            reply.cancel()
