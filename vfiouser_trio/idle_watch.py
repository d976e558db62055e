"""One epoll set per trio run for sockets nobody reads now, so an idle link needs no task.

A link that is read only on demand (the server's twin socket: the peer sends there only the
replies to our requests, spec "twin_socket") must still notice the peer's data or hang-up
while nobody reads it. One waiting reader task per link would cost a task, its suspended
stack and trio's registration of the socket (about 3.5 KiB per connection). Instead, every
such socket is registered in one epoll set of our own, whose fd a single system task of the
trio run waits on. Whenever a watched socket is readable, hung up or failed, its callback
runs in that task (the link reads what is there without blocking, or starts a reader).

The set and its task exist while some transport uses them (:meth:`IdleWatch.acquire`,
:meth:`IdleWatch.release`): a run whose connections are all gone holds no fd for it.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

# Level-triggered: a socket registered while data is already waiting is reported at once, so
# a reader that stops after its last read cannot miss what arrives meanwhile. EPOLLHUP and
# EPOLLERR are always reported.
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP


class IdleWatch:
    """The epoll set of one trio run, shared by the transports that :meth:`acquire` it."""

    __slots__ = ("_callbacks", "_epoll", "_users")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._users = 0

    @staticmethod
    def acquire() -> IdleWatch:
        """The running trio run's watch (created, with its task, when needed); the caller
        must :meth:`release` it once done."""
        watch = _CURRENT.get(None)
        if watch is None:
            watch = IdleWatch()
            _CURRENT.set(watch)
            trio.lowlevel.spawn_system_task(watch._run, name="vfiouser_trio idle sockets")
        watch._users += 1
        return watch

    def release(self) -> None:
        """One user less; the last one closes the set (its task then ends)."""
        self._users -= 1
        if self._users == 0:
            if _CURRENT.get(None) is self:
                _CURRENT.set(None)
            self._callbacks.clear()
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the watch's task whenever ``fd`` has data or has hung up,
        until :meth:`forget`. It must consume what is there (the set is level-triggered) and
        not block. ``fd`` must not be watched already; forget it before it is closed.
        """
        self._epoll.register(fd, _EVENTS)
        self._callbacks[fd] = callback

    def forget(self, fd: int) -> Callable[[], None] | None:
        """Stop watching ``fd``; its callback, or None if it was not watched (any more)."""
        callback = self._callbacks.pop(fd, None)
        if callback is not None:
            self._epoll.unregister(fd)
        return callback

    async def _run(self) -> None:
        epoll = self._epoll
        try:
            while not epoll.closed:
                await trio.lowlevel.wait_readable(epoll.fileno())
                if epoll.closed:
                    break  # released since the wake-up
                for fd, _ in epoll.poll(0):
                    callback = self._callbacks.get(fd)
                    if callback is None:
                        continue  # forgotten by an earlier callback of this batch
                    try:
                        callback()
                    except Exception:
                        # A system task must not raise: that would end the whole trio run.
                        log.exception("idle socket callback failed")
                    if epoll.closed:
                        break  # a callback released the last use
        except trio.ClosedResourceError:
            pass  # released while waiting
        finally:
            epoll.close()


_CURRENT: trio.lowlevel.RunVar[IdleWatch | None] = trio.lowlevel.RunVar("vfiouser_trio.idle_watch")
