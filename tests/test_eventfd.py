"""EventFd: counter and semaphore semantics, and awaiting it under trio."""

from __future__ import annotations

import errno
import gc
import os
import threading
from collections.abc import Callable

import pytest
import trio
import trio.testing

from vfiouser_trio._native import lib
from vfiouser_trio.eventfd import EVENTFD_MAX, EventFd, signal_eventfd

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def test_counter_accumulates_and_a_read_resets_it() -> None:
    with EventFd() as efd:
        assert efd.try_read() is None
        efd.signal()
        efd.signal(2)
        efd.signal(3)
        assert efd.try_read() == 6
        assert efd.try_read() is None
    with EventFd(5) as efd:
        assert efd.try_read() == 5


def test_semaphore_mode_hands_out_one_at_a_time() -> None:
    with EventFd(2, semaphore=True) as efd:
        efd.signal(1)
        assert [efd.try_read() for _ in range(4)] == [1, 1, 1, None]


def test_fd_flags() -> None:
    with EventFd() as efd:
        assert not os.get_blocking(efd.fileno())
        assert not os.get_inheritable(efd.fileno())
    with EventFd(cloexec=False) as efd:
        assert os.get_inheritable(efd.fileno())


def test_signal_limits() -> None:
    with EventFd() as efd:
        for bad in (0, -1, EVENTFD_MAX + 1):
            with pytest.raises(ValueError):
                efd.signal(bad)
        assert efd.signal(EVENTFD_MAX) is True
        assert efd.signal(1) is False  # full: the notification is pending already
        assert efd.try_read() == EVENTFD_MAX
    with pytest.raises(ValueError):
        EventFd(1 << 32)


def test_close_detach_and_adopt() -> None:
    efd = EventFd()
    efd.close()
    efd.close()  # idempotent
    assert efd.closed
    for use in (efd.fileno, efd.try_read, efd.signal, efd.detach):
        with pytest.raises(trio.ClosedResourceError):
            use()

    efd = EventFd()
    raw = efd.detach()
    assert efd.closed
    efd.close()  # must not close the detached fd
    os.eventfd_write(raw, 7)

    blocking = os.eventfd(0)  # a blocking fd, as a peer might send it
    adopted = EventFd.from_fd(blocking)
    assert os.get_blocking(blocking)  # the peer's flags are its own
    assert adopted.try_read() is None  # ... and still no read can block
    adopted.close()
    with pytest.raises(OSError):
        os.fstat(blocking)

    with EventFd.from_fd(raw) as again:
        assert again.try_read() == 7
    with pytest.raises(ValueError):
        EventFd.from_fd(-1)


def test_dropped_eventfd_closes_its_fd() -> None:
    efd = EventFd()
    raw = efd.fileno()
    del efd
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(raw)


async def test_wait_returns_at_once_when_signalled() -> None:
    with EventFd(3) as efd:
        assert await efd.wait() == 3


async def test_a_task_waits_another_signals() -> None:
    received: list[int] = []
    with EventFd() as efd:

        async def waiter() -> None:
            received.append(await efd.wait())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert received == []
            efd.signal(4)
        assert received == [4]
        assert efd.try_read() is None


async def test_semaphore_wait_takes_one_count() -> None:
    with EventFd(semaphore=True) as efd:
        efd.signal(2)
        assert await efd.wait() == 1
        assert await efd.wait() == 1
        assert efd.try_read() is None


async def test_a_second_concurrent_waiter_is_refused() -> None:
    with EventFd() as efd:

        async def waiter() -> None:
            assert await efd.wait() == 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await efd.wait()
            efd.signal()


async def test_close_while_waiting_wakes_the_waiter() -> None:
    efd = EventFd()
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await efd.wait()
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        efd.close()
    assert len(outcome) == 1
    with pytest.raises(trio.ClosedResourceError):
        await efd.wait()


async def test_cancelled_wait_consumes_nothing() -> None:
    with EventFd() as efd:
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                await efd.wait()
                pytest.fail("cancelled wait returned")

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        efd.signal(5)
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await efd.wait()  # cancelled before reading: the count stays
        assert efd.try_read() == 5


# --- a peer shares the description: it may clear O_NONBLOCK and fill the counter -------------


def in_thread(call: Callable[[], object], unstick: Callable[[], object]) -> object:
    """``call()`` in a thread; fail (after ``unstick()``) if it blocks.

    A blocked read or write blocks its whole thread, so only another thread can time it.
    """
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        unstick()
        thread.join(20)
        pytest.fail("blocked on an eventfd the peer made blocking")
    return results[0]


def test_reads_never_block_once_the_peer_clears_o_nonblock() -> None:
    with EventFd() as efd:
        os.set_blocking(efd.fileno(), True)  # what a peer holding it may do
        assert in_thread(efd.try_read, lambda: os.eventfd_write(efd.fileno(), 1)) is None
        efd.signal(3)
        assert efd.try_read() == 3


def test_signal_never_blocks_on_a_full_blocking_eventfd() -> None:
    with EventFd() as efd:
        fd = efd.fileno()
        efd.signal(EVENTFD_MAX)
        os.set_blocking(fd, True)
        assert in_thread(efd.signal, lambda: os.eventfd_read(fd)) is False
        assert in_thread(lambda: signal_eventfd(fd, 1), lambda: os.eventfd_read(fd)) in (
            errno.EAGAIN,
            errno.EINTR,
        )
        assert efd.try_read() == EVENTFD_MAX
        assert efd.signal() is True and efd.try_read() == 1


def test_a_write_the_peer_made_sleep_is_interrupted() -> None:
    """The race behind the poll: the guarded write itself, on a full blocking eventfd."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
    try:
        os.eventfd_write(fd, EVENTFD_MAX)
        for _ in range(2):  # a fresh thread each time: its watch slot comes and goes
            result = in_thread(lambda: lib.vfu_eventfd_write_guarded(fd, 1), lambda: None)
            assert result == -errno.EINTR
        assert lib.vfu_eventfd_write_guarded(fd, 1) == -errno.EINTR  # this thread too
        assert os.eventfd_read(fd) == EVENTFD_MAX
        assert lib.vfu_eventfd_write_guarded(fd, 2) == 0
        assert lib.vfu_eventfd_guard_signo() > 0
    finally:
        os.close(fd)


def test_the_guard_works_in_a_forked_child() -> None:
    """fork() keeps only the calling thread: the child starts a watchdog of its own."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
    try:
        os.eventfd_write(fd, EVENTFD_MAX)
        assert lib.vfu_eventfd_write_guarded(fd, 1) == -errno.EINTR  # parent's watchdog up
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if lib.vfu_eventfd_write_guarded(fd, 1) == -errno.EINTR else 1)

        def exit_code() -> int:
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        assert in_thread(exit_code, lambda: os.eventfd_read(fd)) == 0
    finally:
        os.close(fd)


def test_signal_reports_errors_instead_of_raising() -> None:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        assert signal_eventfd(fd, 1) == errno.EBADF  # a directory, not open for writing
    finally:
        os.close(fd)
    assert signal_eventfd(fd, 1) == errno.EBADF  # closed
