"""Ordering policies built on :mod:`vfiouser_trio.ordering` for prototyping: not conformant.

:class:`BypassOrder` lets reads overtake posted writes to other regions: a read of a register
block need not wait behind a burst of No_reply writes to a slow one. It breaks the spec's
order (https://www.qemu.org/docs/master/interop/vfio-user.html, "Command Concurrency") in one
declared way, :data:`READS_PASS_POSTED_WRITES`, which the spec-order checker
(:func:`vfiouser_trio.testing.check_order`) and the explorer allow. Serve with it as
``vfio-user-trio serve DEVICE --policy vfiouser_trio.policies:BypassOrder``.
"""

from __future__ import annotations

from collections import Counter, deque

import trio

from .ordering import CommandSource, OrderingPolicy, ProcessCommand, Relaxation, region_key
from .protocol.constants import Command
from .protocol.framing import Frame

__all__ = ["READS_PASS_POSTED_WRITES", "BypassOrder"]

#: What :class:`BypassOrder` declares: a REGION_READ's reply may leave before an older
#: posted REGION_WRITE to another region is processed.
READS_PASS_POSTED_WRITES = Relaxation(
    "reads pass posted writes to other regions",
    older={Command.REGION_WRITE},
    younger={Command.REGION_READ},
    older_no_reply=True,
    key=region_key,
)

_READS = "reads"
_OTHERS = "others"


def _key(frame: Frame) -> int | None:
    """A read's or posted write's region; None (waits for all reads, and they for it) else."""
    header = frame.header
    if header.command == Command.REGION_READ or header.no_reply:
        return region_key(frame)
    return None


class BypassOrder(OrderingPolicy):
    """Reads overtake posted writes to other regions, never to the same region.

    Two lanes, each processed one command at a time in arrival order: reads, and everything
    else. An arriving read goes in the read lane when the other lane holds (queued or
    running) nothing but posted writes to other regions, which it may then overtake; else it
    queues behind them in the other lane. A command of the other lane starts only once no
    read of its region (of any region, if it is not a posted region write) is queued or
    running in the read lane. A command counts as pending until its processing has ended.
    A command that finds both lanes empty would start at once, so it may run inline.
    """

    runs_inline = True
    relaxations: tuple[Relaxation, ...] = (READS_PASS_POSTED_WRITES,)

    async def run(self, commands: CommandSource, process: ProcessCommand) -> None:
        lanes: dict[str, deque[tuple[Frame, int | None]]] = {_READS: deque(), _OTHERS: deque()}
        pending: dict[str, Counter[int | None]] = {_READS: Counter(), _OTHERS: Counter()}
        # Who waits for what: each lane for work, the other lane also for reads to end.
        queued = {_READS: trio.Event(), _OTHERS: trio.Event()}
        reads_ended = trio.lowlevel.ParkingLot()

        async def drain(name: str) -> None:
            lane, counts, reads = lanes[name], pending[name], pending[_READS]
            while True:
                while not lane:
                    queued[name] = trio.Event()
                    await queued[name].wait()
                frame, key = lane.popleft()
                if name == _OTHERS:  # wait for the reads this command must not pass
                    while reads[key] if key is not None else reads.total():
                        await reads_ended.park()
                try:
                    await process(frame)
                finally:
                    counts[key] -= 1  # only now: a running write still holds reads back
                    if name == _READS:
                        reads_ended.unpark_all()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, _READS)
            nursery.start_soon(drain, _OTHERS)
            others = pending[_OTHERS]
            while True:
                frame = await commands.get()
                key = _key(frame)
                is_read = frame.header.command == Command.REGION_READ
                name = _READS if is_read and not others[key] and not others[None] else _OTHERS
                if name == _OTHERS and not frame.header.no_reply:
                    key = None  # a read or write with a reply in this lane is a barrier
                pending[name][key] += 1
                lanes[name].append((frame, key))
                queued[name].set()
