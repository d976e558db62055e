"""Two processes, two mappings of one memfd: atomic operations are seen across them.

The child gets the memfd and two eventfds through ``pass_fds``. Eventfds order the
phases; inside a phase each side spins on atomic loads (bounded, no sleeping).
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import textwrap

import trio

from vfiouser_trio.atomics import AtomicView, MemoryOrder
from vfiouser_trio.eventfd import EventFd
from vfiouser_trio.memory import create_memfd

ROOT = pathlib.Path(__file__).resolve().parent.parent
INCREMENTS = 20_000
SPIN_LIMIT = 20_000_000  # far beyond what a live peer needs; only stops a broken test

# Layout of the shared page.
COUNTER = 0  # u64, incremented by both processes at once
FLAG = 8  # u32, the hand-over word of the message-passing phase
ANSWER = 12  # u32, written by the child from the parent's payload
CHILD_PAYLOAD = 64  # bytes written by the child before it releases FLAG
PARENT_PAYLOAD = 128  # bytes written by the parent before it swaps FLAG

CHILD = textwrap.dedent(
    f"""
    import os, select, sys
    from vfiouser_trio.atomics import AtomicView, MemoryOrder
    from vfiouser_trio.memory import Mapping

    memfd, to_child, to_parent = (int(arg) for arg in sys.argv[1:])

    def wait_for(fd):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(60_000):  # a hang guard, not synchronisation
            sys.exit("parent never signalled")
        os.eventfd_read(fd)

    def spin_until(view, offset, value):
        for i in range({SPIN_LIMIT}):
            if view.load_u32(offset, MemoryOrder.ACQUIRE) == value:
                return
            if i % 1024 == 1023:
                os.sched_yield()
        sys.exit(f"word at {{offset}} never became {{value:#x}}")

    mapping = Mapping(memfd, 4096)
    os.close(memfd)
    view = mapping.view
    with AtomicView(view) as shared:
        os.eventfd_write(to_parent, 1)  # mapped
        wait_for(to_child)  # phase 1: race on the counter
        for _ in range({INCREMENTS}):
            shared.fetch_add_u64({COUNTER}, 1, MemoryOrder.RELAXED)
        os.eventfd_write(to_parent, 1)
        wait_for(to_child)  # phase 2: message passing through release/acquire
        view[{CHILD_PAYLOAD}:{CHILD_PAYLOAD} + 16] = bytes(range(16))
        shared.store_u32({FLAG}, 0xC0FFEE, MemoryOrder.RELEASE)
        spin_until(shared, {FLAG}, 0xBEEF)
        answer = sum(view[{PARENT_PAYLOAD}:{PARENT_PAYLOAD} + 16])
        shared.store_u32({ANSWER}, answer, MemoryOrder.RELEASE)
    del view
    mapping.close()
    """
)


def _spin_until(view: AtomicView, offset: int, value: int) -> None:
    for i in range(SPIN_LIMIT):
        if view.load_u32(offset, MemoryOrder.ACQUIRE) == value:
            return
        if i % 1024 == 1023:
            os.sched_yield()  # the child may share our core
    raise AssertionError(f"word at {offset} never became {value:#x}")


async def test_atomics_across_processes() -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    with (
        create_memfd("cross-process", 4096, seal=True) as memfd,
        memfd.map() as mapping,
        EventFd() as to_child,
        EventFd() as to_parent,
    ):
        fds = [memfd.fileno(), to_child.fileno(), to_parent.fileno()]
        command = [sys.executable, "-c", CHILD, *map(str, fds)]
        # run_process checks the exit status; if this test fails, the nursery
        # cancels it and the child is killed.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(trio.run_process, command, pass_fds=fds, env=env, check=True)
            )
            view = mapping.view
            with AtomicView(view) as shared:
                assert await to_parent.wait() == 1  # the child has mapped the page

                # Phase 1: both processes increment one counter at the same time.
                to_child.signal()
                for _ in range(INCREMENTS):
                    shared.fetch_add_u64(COUNTER, 1, MemoryOrder.RELAXED)
                assert await to_parent.wait() == 1
                assert shared.load_u64(COUNTER) == 2 * INCREMENTS

                # Phase 2: each side publishes data, then a flag the other spins on.
                to_child.signal()
                _spin_until(shared, FLAG, 0xC0FFEE)
                assert view[CHILD_PAYLOAD : CHILD_PAYLOAD + 16] == bytes(range(16))
                view[PARENT_PAYLOAD : PARENT_PAYLOAD + 16] = bytes([3] * 16)
                assert shared.compare_exchange_u32(FLAG, 0xC0FFEE, 0xBEEF, MemoryOrder.ACQ_REL) == (
                    True,
                    0xC0FFEE,
                )
                _spin_until(shared, ANSWER, 48)
            del view
    assert len(os.listdir("/proc/self/fd")) == fds_before
