"""irqs: DEVICE_SET_IRQS (spec: "VFIO_USER_DEVICE_SET_IRQS"). The checker's eventfds are
removed again (count 0, DATA_NONE) before the check ends, and its connection closed."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator

import trio

from ....protocol.constants import (
    IRQ_INFO_EVENTFD,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    Command,
)
from ....protocol.irqs import IrqInfoReply
from ..context import Probe
from ..layouts import IRQ_SET as _SET
from ..model import Level, check
from ..wire import Wire, describe

G = "irqs"
S = "VFIO_USER_DEVICE_SET_IRQS"
EINVAL = frozenset({errno.EINVAL})
TRIGGER_EVENTFD = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
#: How long a client-triggered interrupt may take to reach its eventfd.
SIGNAL_WAIT = 1.0


def _set(
    flags: int, index: int, start: int, count: int, data: bytes = b"", argsz: int = 0
) -> bytes:
    return _SET.pack(argsz or _SET.size + len(data), flags, index, start, count) + data


async def _eventfd_irq(probe: Probe) -> tuple[int, IrqInfoReply]:
    """The first IRQ index that takes eventfds and has a vector (else SKIP)."""
    survey = await probe.survey()
    for index, info in enumerate(survey.irqs):
        if info is not None and info.count >= 1 and info.flags & IRQ_INFO_EVENTFD:
            return index, info
    probe.skip("no IRQ index takes eventfds")


async def _call_ok(
    probe: Probe, wire: Wire, payload: bytes, what: str, fds: tuple[int, ...] = ()
) -> None:
    frame = await probe.call_ok(wire, Command.DEVICE_SET_IRQS, payload, what=what, fds=fds)
    if frame.payload:
        probe.warn(
            f"{what}: the reply carries a payload",
            received=describe(frame),
            expected="an empty reply (SET_IRQS has none)",
        )


@contextlib.asynccontextmanager
async def _assigned_eventfd(
    probe: Probe, *, empty_reply: bool = True
) -> AsyncIterator[tuple[int, Wire, int]]:
    """(index, connection, eventfd): a new connection with an eventfd assigned to vector 0 of
    the first index that takes eventfds (else SKIP). The eventfd is closed on leaving; with
    ``empty_reply``, a reply with a payload is a WARN."""
    index, _info = await _eventfd_irq(probe)
    wire = await probe.connect()
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        payload = _set(TRIGGER_EVENTFD, index, 0, 1)
        if empty_reply:
            await _call_ok(probe, wire, payload, "SET_IRQS eventfd", (fd,))
        else:
            await probe.call_ok(
                wire, Command.DEVICE_SET_IRQS, payload, what="SET_IRQS eventfd", fds=(fd,)
            )
        yield index, wire, fd
    finally:
        os.close(fd)


async def _signalled(fd: int) -> bool:
    """Whether the eventfd ``fd`` is (or becomes, within SIGNAL_WAIT) readable; reads it."""
    with trio.move_on_after(SIGNAL_WAIT):
        while True:
            try:
                os.eventfd_read(fd)
                return True
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
    return False


@check(
    "irq-01",
    G,
    Level.MUST,
    S,
    "takes an eventfd for a vector (DATA_EVENTFD|ACTION_TRIGGER), "
    "with an empty reply, and takes it away again with count 0 (disable all)",
)
async def assign(probe: Probe) -> str:
    async with _assigned_eventfd(probe) as (index, wire, _fd):
        await _call_ok(
            probe,
            wire,
            _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, index, 0, 0),
            "SET_IRQS count 0 (disable all)",
        )
    return f"index {index}"


@check(
    "irq-02",
    G,
    Level.SHOULD,
    S,
    "signals a vector's eventfd when the client triggers it "
    "(DATA_NONE|ACTION_TRIGGER, and DATA_BOOL true)",
)
async def client_trigger(probe: Probe) -> None:
    async with _assigned_eventfd(probe) as (index, wire, fd):
        # Unmasked first: a maskable vector may start masked (INTx after a previous client).
        unmask = _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, index, 0, 1)
        await wire.call(Command.DEVICE_SET_IRQS, unmask)  # an unmaskable index may refuse
        for what, payload in (
            (
                "DATA_NONE|ACTION_TRIGGER",
                _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, index, 0, 1),
            ),
            (
                "DATA_BOOL|ACTION_TRIGGER",
                _set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, index, 0, 1, b"\1"),
            ),
        ):
            await _call_ok(probe, wire, payload, f"SET_IRQS {what}")
            if not await _signalled(fd):
                probe.fail(
                    f"SET_IRQS {what}: the vector's eventfd was not signalled",
                    expected=f"the eventfd readable within {SIGNAL_WAIT:g} s",
                )
            await wire.call(Command.DEVICE_SET_IRQS, unmask)  # an automasked vector is masked now
        await _call_ok(
            probe,
            wire,
            _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, index, 0, 0),
            "SET_IRQS count 0 (disable all)",
        )


@check(
    "irq-03",
    G,
    Level.SHOULD,
    S,
    "refuses SET_IRQS that breaks its rules: not one DATA and one "
    "ACTION flag, an index or range past the vectors, BOOL data not one byte per vector, more "
    "eventfds than count, argsz below 20, count 0 with anything but TRIGGER|DATA_NONE (EINVAL)",
)
async def rules(probe: Probe) -> None:
    index, info = await _eventfd_irq(probe)
    survey = await probe.survey()
    wire = await probe.connect()
    none_trigger = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER
    cases = [
        (
            "two DATA flags",
            _set(
                IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, index, 0, 1, b"\1"
            ),
            0,
        ),
        (
            "two ACTION flags",
            _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_TRIGGER, index, 0, 1),
            0,
        ),
        ("no ACTION flag", _set(IRQ_SET_DATA_NONE, index, 0, 1), 0),
        ("index num_irqs", _set(none_trigger, survey.info.num_irqs, 0, 1), 0),
        ("start past the vectors", _set(none_trigger, index, info.count, 1), 0),
        ("start + count past the vectors", _set(none_trigger, index, 0, info.count + 1), 0),
        ("count wrapping past 2^32", _set(none_trigger, index, 1, 0xFFFFFFFF), 0),
        (
            "BOOL data shorter than count",
            _set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, index, 0, 1),
            0,
        ),
        ("argsz 8", _set(none_trigger, index, 0, 1, argsz=8), 0),
        ("two eventfds for count 1", _set(TRIGGER_EVENTFD, index, 0, 1), 2),
        ("count 0 with MASK", _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, index, 0, 0), 0),
    ]
    for what, payload, nfds in cases:
        fds = tuple(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nfds))
        try:
            header, reply = await wire.call(Command.DEVICE_SET_IRQS, payload, fds=fds)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        probe.expect_refused(
            header,
            reply,
            what=f"SET_IRQS with {what}",
            payload=payload,
            errnos=EINVAL,
            may_close=False,
        )


@check("irq-04", G, Level.SHOULD, S, "takes DATA_EVENTFD without fds as de-assigning the vectors")
async def deassign(probe: Probe) -> None:
    async with _assigned_eventfd(probe) as (index, wire, fd):
        await _call_ok(
            probe, wire, _set(TRIGGER_EVENTFD, index, 0, 1), "SET_IRQS DATA_EVENTFD without fds"
        )
        # De-assigned: a client trigger no longer reaches the old eventfd.
        await _call_ok(
            probe,
            wire,
            _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, index, 0, 1),
            "SET_IRQS DATA_NONE|ACTION_TRIGGER",
        )
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        probe.fail(
            "the eventfd was signalled after it was de-assigned",
            expected="no signal on a de-assigned eventfd",
        )
