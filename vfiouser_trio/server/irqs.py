"""Interrupt state of a served device: eventfds per vector, masking, pending bits.

A device raises an interrupt with ``IrqIndex.trigger(vector)``. The client decides
where it goes with VFIO_USER_DEVICE_SET_IRQS: an eventfd per vector (signalled on
delivery), mask/unmask (a masked vector holds the interrupt pending and delivers it
when unmasked), and client-side triggers. Devices may add a *gate* (MSI-X table
masking, a quiesced device): while the gate says no, a trigger is held pending too.

An index with ``IRQ_INFO_AUTOMASKED`` (INTx by default, as Linux vfio-pci reports it)
masks a vector each time it delivers one, until the client unmasks it: QEMU does after
each guest EOI, a client that never unmasks sees one interrupt only (declare INTx with
``Device.add_intx(automask=False)`` for such clients). That mask is a handshake with the
client whose eventfd took the interrupt, so it is the client's, not the device's: a vector
that gets a trigger eventfd where it had none (a new client, QEMU enabling INTx after a
reset or a hot-plug, a migration destination) starts unmasked, as the kernel's vfio-pci
starts INTx when it enables it, and a migrated mask never overrides the one of a
destination client that has already enabled the vector (see ``restore_state``).

The device may watch the client's masking (libvfio-user's ``vfu_setup_irq_state_callback``):
`IrqTable.set_state_hook` installs ``hook(index, start, count, masked)``, told of every
SET_IRQS MASK/UNMASK (DATA_NONE: the whole range in one call; DATA_BOOL: each vector
selected; a mask/unmask eventfd: each signal), as the client sent it, and, through
`IrqTable.state_changed`, of the client's MSI/MSI-X mask bits in config space and the
MSI-X table (``server/pci.py``, ``server/msix.py``). A plain hook is called at once, after
the change; an async one runs in a task of the session, the calls one after another in
order (the client's command does not wait for it; at most
``ServerLimits.max_irq_state_backlog`` calls wait, further ones are dropped and logged; calls
left when the client goes are dropped). Async calls are made only while a client is
attached. A hook that raises is a device bug (``server/device_errors.py``): logged, told
to the listeners, and the client's command still succeeds: the mask has changed already.
Automasking (INTx masking itself on delivery) is the framework's, not the client's, and is
not reported.

Every fd of a SET_IRQS must be an eventfd (checked when it arrives, or the whole
request is refused with EINVAL and changes nothing). Delivery never blocks and never
raises into device code, whatever the client does to its eventfd (clears O_NONBLOCK,
fills the counter): an interrupt that cannot be signalled is counted per vector
(``lost``) and logged once per vector and cause. A full counter means the client has
an interrupt pending already, so such a trigger is coalesced rather than missing.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import trio

from ..eventfd import COUNTER_FULL, signal_eventfd, try_eventfd_read
from ..fdcheck import require_eventfd
from ..limits import DEFAULT_LIMITS
from ..protocol.constants import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_TYPE_MASK,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    IRQ_SET_DATA_TYPE_MASK,
    PciIrq,
)
from ..protocol.errors import VfioUserError
from .device_errors import DeviceErrors

if TYPE_CHECKING:
    from .pci import PciConfigSpace

log = logging.getLogger(__name__)

#: Flags reported by DEVICE_GET_IRQ_INFO per PCI IRQ index, as Linux vfio-pci reports them,
#: plus MASKABLE on MSI/MSI-X since we implement vfio-level masking for every vector.
#: ERR and REQ take a trigger eventfd only (see ``IrqIndex.set_irqs``).
DEFAULT_IRQ_FLAGS: dict[int, int] = {
    PciIrq.INTX: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
    PciIrq.MSI: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
    PciIrq.MSIX: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
    PciIrq.ERR: IRQ_INFO_EVENTFD,
    PciIrq.REQ: IRQ_INFO_EVENTFD,
}

#: INTx flags of a device that declares it with ``add_intx(automask=False)``: maskable, but
#: every trigger is delivered until the client masks it (libvfio-user's INTx behaves so).
INTX_EDGE_FLAGS = IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE

#: Vectors every PCI device declares unless its author opts out (``Device.add_irq(index, 0)``):
#: QEMU enables error recovery only when ERR has exactly one vector (else it warns "Could not
#: enable error recovery for the device" at every start); REQ is the device's request to be
#: released (QEMU's vfio-pci then unplugs it; 10.2's vfio-user-pci does not listen on it yet).
#: libvfio-user's servers declare both too.
DEFAULT_IRQ_COUNTS: dict[int, int] = {PciIrq.ERR: 1, PciIrq.REQ: 1}

#: Bits of one vector in ``IrqIndex.save_state()``.
IRQ_STATE_MASKED = 0x1
IRQ_STATE_PENDING = 0x2

#: Returns True when the vector may be delivered now; False holds it pending.
Gate = Callable[[int], bool]

#: ``hook(index, start, count, masked)``: the client masked (True) or unmasked vectors
#: ``start`` .. ``start + count - 1`` of IRQ ``index``; an ``async def`` or a plain function.
StateHook = Callable[[int, int, int, bool], Awaitable[None] | None]
#: How an index tells its table of the client's mask changes (see `IrqTable.state_changed`).
StateNotify = Callable[[int, int, int, bool], None]
#: One call of the state hook: index, start, count, masked, and the command that made it.
_HookCall = tuple[int, int, int, bool, str]
#: Calls of an async state hook that may wait, outside a session with its own limits.
DEFAULT_STATE_BACKLOG = DEFAULT_LIMITS.max_irq_state_backlog


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """What DEVICE_GET_IRQ_INFO reports for one IRQ index."""

    index: int
    count: int
    flags: int


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


class IrqIndex:
    """One IRQ type (INTx, MSI, MSI-X, ERR, REQ, or a device-specific index)."""

    def __init__(
        self, index: int, count: int, flags: int | None = None, *, owner: str = ""
    ) -> None:
        if count < 0:
            raise ValueError("IRQ count must be >= 0")
        self.index = index
        self.count = count
        self.flags = DEFAULT_IRQ_FLAGS.get(index, IRQ_INFO_EVENTFD) if flags is None else flags
        self._trigger_fds: list[int | None] = [None] * count
        self._masked = [False] * count
        self._pending = [False] * count
        self._watchers: dict[tuple[int, int], trio.CancelScope] = {}
        self._gate: Gate | None = None
        self._nursery: trio.Nursery | None = None
        #: Who the index belongs to (the device's name), for log lines.
        self.owner = owner
        #: Deliveries, for tests and statistics.
        self.delivered = 0
        self._lost = [0] * count
        self._stalled = [False] * count
        #: (vector, errno) already logged for the eventfd now assigned to that vector.
        self._warned: set[tuple[int, int]] = set()
        #: Told of the client's MASK/UNMASK (set by `IrqTable.set_state_hook`).
        self.state_notify: StateNotify | None = None

    @property
    def info(self) -> IrqInfo:
        return IrqInfo(self.index, self.count, self.flags)

    @property
    def maskable(self) -> bool:
        return bool(self.flags & IRQ_INFO_MASKABLE)

    @property
    def automasked(self) -> bool:
        """Each delivery masks the vector until the client unmasks it (level-style INTx)."""
        return bool(self.flags & IRQ_INFO_AUTOMASKED)

    def set_gate(self, gate: Gate | None) -> None:
        """Install a device-level gate (consulted on every trigger)."""
        self._gate = gate

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Give the index a nursery for watching mask/unmask eventfds (None detaches)."""
        self._nursery = nursery

    # --- device side -------------------------------------------------------------------

    def has_eventfd(self, vector: int) -> bool:
        self._check_vector(vector)
        return self._trigger_fds[vector] is not None

    def is_masked(self, vector: int) -> bool:
        self._check_vector(vector)
        return self._masked[vector]

    def is_pending(self, vector: int) -> bool:
        self._check_vector(vector)
        return self._pending[vector]

    def lost(self, vector: int) -> int:
        """Interrupts of ``vector`` that could not be signalled to its eventfd.

        Most are coalesced, not missing: the client's counter was full, so it has
        an interrupt pending already. The count survives eventfd changes.
        """
        self._check_vector(vector)
        return self._lost[vector]

    def trigger(self, vector: int = 0) -> bool:
        """Raise the interrupt; returns True if it was delivered to an eventfd now.

        A masked or gated vector is held pending and delivered on unmask. With no
        eventfd configured the interrupt goes nowhere (as on hardware with the
        interrupt disabled) and False is returned. Never blocks and never raises for
        the client's eventfd: one that cannot be signalled returns False and counts in
        ``lost(vector)``. A full counter means the client has one pending already: the
        trigger is coalesced into it (and INTx masks itself as if delivered). A client
        that fills its counter *while* we write to it is not written to again until it
        assigns another eventfd: each such race would cost the whole process a stall.
        """
        self._check_vector(vector)
        if self._masked[vector] or (self._gate is not None and not self._gate(vector)):
            self._pending[vector] = True
            return False
        return self._deliver(vector)

    def release(self, vector: int) -> bool:
        """Deliver a held interrupt if the vector is now unmasked and the gate is open."""
        self._check_vector(vector)
        if not self._pending[vector] or self._masked[vector]:
            return False
        if self._gate is not None and not self._gate(vector):
            return False
        self._pending[vector] = False
        return self._deliver(vector)

    def release_all(self) -> int:
        """Deliver every held interrupt that may now go; returns how many were delivered."""
        return sum(self.release(v) for v in range(self.count) if self._pending[v])

    def mask(self, vector: int) -> None:
        self._check_vector(vector)
        self._masked[vector] = True

    def unmask(self, vector: int) -> None:
        self._check_vector(vector)
        self._masked[vector] = False
        self.release(vector)

    def _deliver(self, vector: int) -> bool:
        fd = self._trigger_fds[vector]
        if fd is None:
            return False
        err = errno.EINTR if self._stalled[vector] else signal_eventfd(fd)
        if err:
            self._count_lost(vector, err)
            if err == errno.EINTR:
                # The client filled its counter while we wrote to it: only a hostile or
                # broken client does that, and each time costs the loop a watchdog period
                # (see eventfd.py), so this eventfd is not written again until replaced.
                self._stalled[vector] = True
            if err not in COUNTER_FULL:
                return False
            # Coalesced: the client's eventfd holds an interrupt already, so INTx still
            # masks itself below and later triggers wait for the unmask.
        else:
            self.delivered += 1
        if self.automasked:
            # Level-style interrupts (INTx) mask themselves until the client unmasks.
            self._masked[vector] = True
        return not err

    def _count_lost(self, vector: int, err: int) -> None:
        self._lost[vector] += 1
        if (vector, err) in self._warned:
            return
        # Once per vector and cause: a client keeping its counter full must not flood the log.
        self._warned.add((vector, err))
        if err == errno.EAGAIN:
            reason = "the client's eventfd counter is full (coalesced)"
        elif err == errno.EINTR:
            reason = (
                "the client filled its eventfd counter while we signalled it; that eventfd "
                "is not signalled again until the client assigns another"
            )
        else:
            reason = os.strerror(err)
        log.warning(
            "%s: IRQ index %d vector %d: interrupt not signalled: %s; counting further ones "
            "in lost()",
            self.owner or "device",
            self.index,
            vector,
            reason,
        )

    def _forget_warnings(self, vector: int) -> None:
        # A new eventfd (often a new client) gets its own warning if it fails too.
        self._warned = {w for w in self._warned if w[0] != vector}

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.count:
            raise ValueError(f"IRQ index {self.index} has no vector {vector} (count {self.count})")

    # --- VFIO_USER_DEVICE_SET_IRQS -------------------------------------------------------

    def set_irqs(self, flags: int, start: int, count: int, data: bytes, fds: Sequence[int]) -> None:
        """Apply a SET_IRQS request whose structure the protocol layer already checked.

        Ownership of ``fds`` moves here: they are kept or closed, whatever happens.
        Semantic errors, and any fd that is not an eventfd, raise VfioUserError(EINVAL)
        before anything changes (see "VFIO_USER_DEVICE_SET_IRQS" in
        https://www.qemu.org/docs/master/interop/vfio-user.html).
        """
        fds = list(fds)
        try:
            self._validate(flags, start, count, data, fds)
            for fd in fds:
                require_eventfd(fd, f"SET_IRQS index {self.index}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        action = flags & IRQ_SET_ACTION_TYPE_MASK
        data_type = flags & IRQ_SET_DATA_TYPE_MASK
        if count == 0:
            self.disable()
            return
        vectors = range(start, start + count)
        if data_type == IRQ_SET_DATA_EVENTFD:
            if action == IRQ_SET_ACTION_TRIGGER:
                self._assign_trigger_fds(vectors, fds)
            else:
                self._assign_watch_fds(action, vectors, fds)
            return
        selected = (
            list(vectors)
            if data_type == IRQ_SET_DATA_NONE
            else [v for v, b in zip(vectors, data, strict=True) if b]
        )
        for v in selected:
            if action == IRQ_SET_ACTION_TRIGGER:
                self.trigger(v)
            elif action == IRQ_SET_ACTION_MASK:
                self.mask(v)
            else:
                self.unmask(v)
        if action != IRQ_SET_ACTION_TRIGGER and self.state_notify is not None:
            masked = action == IRQ_SET_ACTION_MASK
            if data_type == IRQ_SET_DATA_NONE:
                self.state_notify(self.index, start, count, masked)
            else:
                for v in selected:
                    self.state_notify(self.index, v, 1, masked)

    def _validate(
        self, flags: int, start: int, count: int, data: bytes, fds: Sequence[int]
    ) -> None:
        action = flags & IRQ_SET_ACTION_TYPE_MASK
        data_type = flags & IRQ_SET_DATA_TYPE_MASK
        if self.index in (PciIrq.ERR, PciIrq.REQ) and (
            action != IRQ_SET_ACTION_TRIGGER or count > 1
        ):
            raise VfioUserError(errno.EINVAL, "ERR/REQ IRQs take only TRIGGER with count <= 1")
        if count == 0:
            if start != 0 or flags != (IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE) or fds:
                raise VfioUserError(
                    errno.EINVAL, "count 0 needs start 0 and exactly TRIGGER|DATA_NONE"
                )
            return
        # Python ints do not wrap, which is the saturating check the reference asks for.
        if start >= self.count or start + count > self.count:
            raise VfioUserError(
                errno.EINVAL,
                f"vectors {start}..{start + count - 1} exceed IRQ {self.index}'s "
                f"count {self.count}",
            )
        if action in (IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK) and not self.maskable:
            raise VfioUserError(errno.EINVAL, f"IRQ index {self.index} is not maskable")
        if data_type == IRQ_SET_DATA_EVENTFD:
            if fds and len(fds) != count:
                raise VfioUserError(errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
            if fds and action != IRQ_SET_ACTION_TRIGGER and self._nursery is None:
                raise VfioUserError(errno.EINVAL, "mask/unmask eventfds need a running device")
        elif fds:
            raise VfioUserError(errno.EINVAL, "file descriptors sent without DATA_EVENTFD")
        if data_type == IRQ_SET_DATA_BOOL and len(data) != count:
            raise VfioUserError(errno.EINVAL, f"{len(data)} BOOL bytes for {count} vectors")

    def _assign_trigger_fds(self, vectors: range, fds: list[int]) -> None:
        enabled = []
        for i, v in enumerate(vectors):
            old = self._trigger_fds[v]
            _close(old)
            self._forget_warnings(v)
            self._stalled[v] = False
            # No fds at all de-assigns the range.
            self._trigger_fds[v] = fds[i] if fds else None
            if old is None and fds and self.automasked:
                enabled.append(v)
        for v in enabled:
            # Enabled now: this client never took the interrupt that masked it, so it would
            # never unmask it (QEMU unmasks only after an interrupt it delivered).
            self.unmask(v)

    def _assign_watch_fds(self, action: int, vectors: range, fds: list[int]) -> None:
        for i, v in enumerate(vectors):
            old = self._watchers.pop((action, v), None)
            if old is not None:
                old.cancel()
            if not fds:
                continue
            assert self._nursery is not None  # checked by _validate
            scope = trio.CancelScope()
            self._watchers[(action, v)] = scope
            self._nursery.start_soon(self._watch, scope, fds[i], action, v)

    async def _watch(self, scope: trio.CancelScope, fd: int, action: int, vector: int) -> None:
        """Mask or unmask ``vector`` each time the client signals ``fd`` (kernel irqfd style)."""
        try:
            with scope:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    # RWF_NOWAIT: the client may have cleared O_NONBLOCK on this fd.
                    try:
                        if try_eventfd_read(fd) is None:
                            continue
                    except OSError as exc:  # not expected of a checked eventfd we own
                        log.warning(
                            "%s: IRQ index %d vector %d: mask/unmask eventfd unusable (%s); "
                            "no longer watched",
                            self.owner or "device",
                            self.index,
                            vector,
                            exc,
                        )
                        return
                    if action == IRQ_SET_ACTION_MASK:
                        self.mask(vector)
                    else:
                        self.unmask(vector)
                    if self.state_notify is not None:
                        self.state_notify(self.index, vector, 1, action == IRQ_SET_ACTION_MASK)
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    # --- migration ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        """One byte per vector: bit 0 masked, bit 1 pending (eventfds are not state)."""
        return bytes(
            (IRQ_STATE_MASKED if masked else 0) | (IRQ_STATE_PENDING if pending else 0)
            for masked, pending in zip(self._masked, self._pending, strict=True)
        )

    def check_state(self, data: bytes) -> None:
        """ValueError unless ``data`` could be this index's ``save_state()``."""
        if len(data) != self.count:
            raise ValueError(
                f"IRQ index {self.index}: state for {len(data)} vectors, not {self.count}"
            )
        if any(b & ~(IRQ_STATE_MASKED | IRQ_STATE_PENDING) for b in data):
            raise ValueError(f"IRQ index {self.index}: unknown vector state bits")

    def restore_state(self, data: bytes) -> None:
        """Load masked / pending bits saved by ``save_state`` (migration).

        On an automasked index, a vector whose trigger eventfd the destination's client
        has assigned already keeps that client's mask: the source's automask waited for
        the source client's unmask, which a destination client that enables INTx before
        the stream arrives (as QEMU's vfio-pci does at realize) would never send: it unmasks
        only after an interrupt it delivered itself. A vector not enabled yet takes
        the source's bit and starts unmasked when its client enables it.
        Nothing is delivered here: a pending vector goes out when it may (unmasked, gate
        open, an eventfd assigned), e.g. when a stopped device runs again.
        """
        self.check_state(data)
        self._masked = [
            masked if self.automasked and fd is not None else bool(b & IRQ_STATE_MASKED)
            for b, masked, fd in zip(data, self._masked, self._trigger_fds, strict=True)
        ]
        self._pending = [bool(b & IRQ_STATE_PENDING) for b in data]

    def disable(self) -> None:
        """Drop every eventfd of this index (count-0 SET_IRQS, client disconnect)."""
        for v in range(self.count):
            _close(self._trigger_fds[v])
            self._trigger_fds[v] = None
            self._stalled[v] = False
        self._warned.clear()
        for scope in self._watchers.values():
            scope.cancel()
        self._watchers.clear()


class IrqTable:
    """All IRQ indexes of a device, by index."""

    def __init__(self, indexes: Sequence[IrqIndex]) -> None:
        self._indexes = {irq.index: irq for irq in indexes}
        self.num_irqs = max(self._indexes, default=-1) + 1
        self._hook: StateHook | None = None
        self._hook_is_async = False
        self._errors = DeviceErrors("device")
        #: The session's queue of async hook calls (None: no session, or a plain hook).
        self._calls: trio.MemorySendChannel[_HookCall] | None = None
        #: Calls of an async state hook dropped because the backlog was full.
        self.state_calls_dropped = 0

    # --- the device's interrupt state hook ---------------------------------------------

    def set_state_hook(self, hook: StateHook | None, errors: DeviceErrors) -> None:
        """Tell ``hook`` of the client's masking (see the module doc); ``errors`` gets its bugs."""
        self._hook = hook
        self._hook_is_async = inspect.iscoroutinefunction(hook)
        self._errors = errors
        notify = None if hook is None else partial(self.state_changed, command="SET_IRQS")
        for irq in self._indexes.values():
            irq.state_notify = notify

    def state_changed(
        self, index: int, start: int, count: int, masked: bool, *, command: str = "REGION_WRITE"
    ) -> None:
        """The client masked or unmasked vectors (by ``command``): call the state hook, if set."""
        hook = self._hook
        if hook is None:
            return
        call = (index, start, count, masked, command)
        if self._hook_is_async:
            self._queue(call)
            return
        try:
            result = hook(index, start, count, masked)
        except Exception as exc:
            self._hook_failed(call, exc)
            return
        if result is not None:
            close = getattr(result, "close", None)
            if close is not None:
                close()  # a coroutine nobody will await
            reason = "a plain irq_state_changed returned a value; make it async def to be awaited"
            self._errors.bug(command, "in the interrupt state hook", reason)

    def _queue(self, call: _HookCall) -> None:
        if self._calls is None:
            return  # no client: nobody masked anything
        try:
            self._calls.send_nowait(call)
        except trio.WouldBlock:
            self.state_calls_dropped += 1
            if self.state_calls_dropped == 1 or self.state_calls_dropped % 1000 == 0:
                log.warning(
                    "%s: the interrupt state hook is %d calls behind the client's masking "
                    "(ServerLimits.max_irq_state_backlog); %d call(s) dropped so far",
                    self._errors.device,
                    self._calls.statistics().max_buffer_size,
                    self.state_calls_dropped,
                )

    def _hook_failed(self, call: _HookCall, exc: Exception) -> None:
        index, start, count, masked, command = call
        what = f"irq_state_changed(index={index}, start={start}, count={count}, masked={masked})"
        self._errors.bug(command, "in the interrupt state hook", f"{what} raised {exc!r}", exc)

    async def _run_state_hooks(self, calls: trio.MemoryReceiveChannel[_HookCall]) -> None:
        """Await the async hook's calls one after another, in the order they were made."""
        hook = self._hook
        assert hook is not None
        async with calls:
            async for call in calls:
                index, start, count, masked, _ = call
                try:
                    result = hook(index, start, count, masked)
                    if result is not None:
                        await result
                except Exception as exc:
                    self._hook_failed(call, exc)

    def __getitem__(self, index: int) -> IrqIndex:
        try:
            return self._indexes[index]
        except KeyError:
            raise VfioUserError(errno.EINVAL, f"no IRQ index {index}") from None

    def get(self, index: int) -> IrqIndex | None:
        return self._indexes.get(index)

    def info(self, index: int) -> IrqInfo:
        """IRQ info for any index below num_irqs (unused indexes report count 0)."""
        irq = self._indexes.get(index)
        if irq is not None:
            return irq.info
        if 0 <= index < self.num_irqs:
            return IrqInfo(index, 0, DEFAULT_IRQ_FLAGS.get(index, IRQ_INFO_EVENTFD))
        raise VfioUserError(errno.EINVAL, f"no IRQ index {index}")

    def attach(
        self, nursery: trio.Nursery | None, *, state_backlog: int = DEFAULT_STATE_BACKLOG
    ) -> None:
        """Give every index the session's nursery (None: the session is over).

        An async state hook's calls run one after another in a task there, at most
        ``state_backlog`` waiting (``ServerLimits.max_irq_state_backlog``; beyond it a call
        is dropped, counted in ``state_calls_dropped`` and logged). Calls a departing
        client left waiting are dropped.
        """
        for irq in self._indexes.values():
            irq.attach(nursery)
        if self._calls is not None:
            self._calls.close()  # its task ends; a new session gets a queue of its own
            self._calls = None
        if nursery is not None and self._hook is not None and self._hook_is_async:
            send, receive = trio.open_memory_channel[_HookCall](state_backlog)
            self._calls = send
            nursery.start_soon(self._run_state_hooks, receive)

    def disable_all(self) -> None:
        for irq in self._indexes.values():
            irq.disable()

    def __iter__(self) -> Iterator[IrqIndex]:
        return iter(self._indexes.values())


class IrqStateHooks:
    """The interrupt state hook of a :class:`~vfiouser_trio.server.Device` (which inherits it)."""

    #: A plain hook: an override may be ``def`` or ``async def`` (see Device's fence).
    _vfu_hooks: ClassVar[frozenset[str]] = frozenset({"irq_state_changed"})

    def irq_state_changed(
        self, index: int, start: int, count: int, masked: bool
    ) -> Awaitable[None] | None:
        """The client masked (``masked``) or unmasked vectors ``start`` .. ``start + count - 1``
        of IRQ ``index`` (libvfio-user's ``vfu_setup_irq_state_callback``).

        Override it (``def`` or ``async def``) to hear of SET_IRQS MASK/UNMASK, MSI per-vector
        mask bits, MSI-X table entries' mask bits and the MSI-X function mask (``start`` 0,
        ``count`` every vector); when, in what order, and errors: ``vfiouser_trio.server.irqs``.
        """
        return None


def install_state_hook(
    device: IrqStateHooks, irqs: IrqTable, config: PciConfigSpace, errors: DeviceErrors
) -> None:
    """Wire ``device``'s ``irq_state_changed`` to ``irqs`` and ``config``, if it overrides it."""
    if type(device).irq_state_changed is IrqStateHooks.irq_state_changed:
        return  # nothing to tell: masking costs nothing extra
    irqs.set_state_hook(device.irq_state_changed, errors)
    config.irq_mask_changed.connect(irqs.state_changed)
