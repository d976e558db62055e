"""The device migration state machine of VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, sans-io.

The spec (``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE``: Direct / Complex State Transitions) defines
a Mealy machine: the device acts on the *arcs* between states. A ``SET`` naming a state that is
not one direct arc away is carried out as the shortest chain of direct arcs whose interior holds
no "saving group" state (PRE_COPY, STOP_COPY); only the start and the end may be saving states.

Everything here is pure: :class:`MigrationFsm` answers which arcs a transition takes (from a
table computed once per capability set), :class:`Transition` tracks where the device stands
while the caller executes those arcs, and :func:`command_allowed` says which commands a device
accepts in a given state. Who runs the arcs, and how, is the server's business.

Decisions worth knowing (checked against the spec, Linux ``vfio_mig_get_next_state`` and
libvfio-user's ``next_state`` table, which all agree on every path below):

* PRE_COPY -> STOP is (RUNNING, STOP), not (STOP_COPY, STOP): both are two arcs long, but the
  second has STOP_COPY in its interior. Likewise PRE_COPY -> RESUMING is
  (RUNNING, STOP, RESUMING) and RUNNING -> STOP_COPY is (STOP, STOP_COPY).
* STOP_COPY -> PRE_COPY would be reachable as (STOP, RUNNING, PRE_COPY) with a clean interior;
  the spec forbids it explicitly, so it is removed from the table after the search.
* ERROR can never be requested (not even from ERROR), and no transition starts from ERROR: only
  DEVICE_RESET leaves it (:meth:`MigrationFsm.after_reset`).
* RUNNING_P2P / PRE_COPY_P2P are not used by vfio-user: every transition to or from them is
  refused, whatever the capability flags say (a MIGRATION_P2P bit is ignored).
"""

from __future__ import annotations

import errno
import functools
import itertools
from collections import deque
from collections.abc import Mapping
from typing import NamedTuple

from .constants import MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, Command, MigState
from .errors import ProtocolError

__all__ = [
    "DIRECT_ARCS",
    "P2P_STATES",
    "SAVING_STATES",
    "Arc",
    "MigrationFsm",
    "Transition",
    "command_allowed",
    "require_command_allowed",
]


class Arc(NamedTuple):
    """One direct arc of the FSM: the device acts while moving from ``src`` to ``dst``."""

    src: MigState
    dst: MigState


#: The "saving group": states in which migration data can be read out.
SAVING_STATES: frozenset[MigState] = frozenset({MigState.PRE_COPY, MigState.STOP_COPY})

#: Peer-to-peer states of <linux/vfio.h>, not used in vfio-user.
P2P_STATES: frozenset[MigState] = frozenset({MigState.RUNNING_P2P, MigState.PRE_COPY_P2P})

#: Every direct arc the spec lists, for a device that supports PRE_COPY.
DIRECT_ARCS: frozenset[Arc] = frozenset(
    {
        Arc(MigState.RUNNING, MigState.STOP),
        Arc(MigState.STOP_COPY, MigState.STOP),
        Arc(MigState.RESUMING, MigState.STOP),
        Arc(MigState.PRE_COPY, MigState.RUNNING),
        Arc(MigState.STOP, MigState.RUNNING),
        Arc(MigState.RUNNING, MigState.PRE_COPY),
        Arc(MigState.STOP, MigState.STOP_COPY),
        Arc(MigState.PRE_COPY, MigState.STOP_COPY),
        Arc(MigState.STOP, MigState.RESUMING),
    }
)

#: Transitions the spec forbids even though a path over the arcs exists.
_FORBIDDEN: frozenset[tuple[MigState, MigState]] = frozenset(
    {(MigState.STOP_COPY, MigState.PRE_COPY)}
)

_BASE_STATES: frozenset[MigState] = frozenset(
    {MigState.STOP, MigState.RUNNING, MigState.STOP_COPY, MigState.RESUMING}
)

_PathTable = Mapping[tuple[MigState, MigState], tuple[MigState, ...]]


def _refused(message: str) -> ProtocolError:
    return ProtocolError(message, errno=errno.EINVAL, command=Command.DEVICE_FEATURE)


@functools.cache
def _tables(pre_copy: bool) -> tuple[frozenset[MigState], frozenset[Arc], _PathTable]:
    """States, arcs and the complete path table of a device with or without PRE_COPY.

    Computed once per capability set; a request is then a dictionary look-up.
    """
    states = (_BASE_STATES | {MigState.PRE_COPY}) if pre_copy else _BASE_STATES
    arcs = frozenset(arc for arc in DIRECT_ARCS if arc.src in states and arc.dst in states)
    # Sorted successors keep the search deterministic (the spec's rules leave no ties anyway).
    successors = {s: sorted(arc.dst for arc in arcs if arc.src == s) for s in states}

    table: dict[tuple[MigState, MigState], tuple[MigState, ...]] = {}
    for start in sorted(states):
        parent: dict[MigState, MigState | None] = {start: None}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            # A saving state may start or end a path, but never be passed through.
            if node != start and node in SAVING_STATES:
                continue
            for nxt in successors[node]:
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        for end in parent:
            steps: list[MigState] = []
            node_or_none: MigState | None = end
            while node_or_none is not None and node_or_none != start:
                steps.append(node_or_none)
                node_or_none = parent[node_or_none]
            table[(start, end)] = tuple(reversed(steps))
    for pair in _FORBIDDEN:
        table.pop(pair, None)
    return frozenset(states), arcs, table


def _as_state(value: int) -> MigState:
    try:
        return MigState(value)
    except ValueError:
        raise _refused(f"unknown migration state {value}") from None


class MigrationFsm:
    """The migration FSM of one device, given its VFIO_DEVICE_FEATURE_MIGRATION ``flags``.

    ``flags`` must include MIGRATION_STOP_COPY (the spec requires it of every migratable
    device); MIGRATION_PRE_COPY adds the PRE_COPY state and its arcs. Other bits (P2P) are
    ignored: vfio-user never uses the P2P states.
    """

    __slots__ = ("_arcs", "_flags", "_states", "_table")

    def __init__(self, flags: int) -> None:
        if not flags & MIGRATION_STOP_COPY:
            raise ValueError("migration flags must include MIGRATION_STOP_COPY")
        self._flags = flags
        self._states, self._arcs, self._table = _tables(bool(flags & MIGRATION_PRE_COPY))

    @property
    def flags(self) -> int:
        """The capability flags this FSM was built from."""
        return self._flags

    @property
    def supports_pre_copy(self) -> bool:
        """Whether the device has the PRE_COPY state."""
        return MigState.PRE_COPY in self._states

    @property
    def supported_states(self) -> frozenset[MigState]:
        """States a SET may name and the device may rest in (ERROR is reached only by failure)."""
        return self._states

    @property
    def arcs(self) -> frozenset[Arc]:
        """The direct arcs of this device (those touching PRE_COPY only if it is supported)."""
        return self._arcs

    def is_direct_arc(self, src: MigState, dst: MigState) -> bool:
        """Whether ``src -> dst`` is a single direct arc of this device."""
        return Arc(src, dst) in self._arcs

    def path(self, current: MigState, target: MigState | int) -> tuple[MigState, ...]:
        """The states the device passes through to get from ``current`` to ``target``.

        Each consecutive pair (starting from ``current``) is one direct arc; ``current`` itself
        is not included, ``target`` is last. Empty when ``current == target``. ``target`` may be
        the raw ``device_state`` from the wire.

        Raises ProtocolError (EINVAL) for a refused transition: an unknown or unsupported state,
        a P2P state, ERROR as target or as start, or STOP_COPY -> PRE_COPY.
        """
        target = _as_state(target)
        found = self._table.get((current, target))
        if found is not None:
            return found
        if target == MigState.ERROR:
            raise _refused("ERROR cannot be requested as a migration state")
        if current == MigState.ERROR:
            raise _refused("the device is in ERROR: only DEVICE_RESET leaves it")
        if target in P2P_STATES or current in P2P_STATES:
            raise _refused("P2P migration states are not used in vfio-user")
        if target not in self._states or current not in self._states:
            state = target if target not in self._states else current
            raise _refused(f"migration state {state.name} is not supported by this device")
        raise _refused(f"migration transition {current.name} -> {target.name} is not allowed")

    def transition(self, current: MigState, target: MigState | int) -> Transition:
        """A :class:`Transition` driver for ``current -> target`` (EINVAL if refused)."""
        return Transition(current, self.path(current, target))

    @staticmethod
    def after_reset() -> MigState:
        """The state after DEVICE_RESET, from any state including ERROR: RUNNING."""
        return MigState.RUNNING


class Transition:
    """Tracks one multi-arc state change while the caller executes its arcs; does no I/O.

    Obtain one from :meth:`MigrationFsm.transition`, which validates the request.

    Usage: while :attr:`next_arc` is not None, execute it, then report :meth:`arc_done` or
    :meth:`arc_failed`. A failed arc ends the transition: the device stays in the arc's start
    state if the failure could be undone (``restored=True``), otherwise it is in ERROR.
    :attr:`state` is always the device's state as the caller must report it.
    """

    __slots__ = ("_failed", "_remaining", "_state", "_target")

    def __init__(self, current: MigState, path: tuple[MigState, ...]) -> None:
        self._state = current
        self._remaining = path
        self._target = path[-1] if path else current
        self._failed = False

    @property
    def state(self) -> MigState:
        """The state the device is in now."""
        return self._state

    @property
    def target(self) -> MigState:
        """The state this transition was asked to reach."""
        return self._target

    @property
    def next_arc(self) -> Arc | None:
        """The arc to execute next; None once the target is reached or an arc failed."""
        if self._failed or not self._remaining:
            return None
        return Arc(self._state, self._remaining[0])

    @property
    def remaining_arcs(self) -> tuple[Arc, ...]:
        """Every arc still to execute, in order (empty once finished)."""
        if self._failed:
            return ()
        states = (self._state, *self._remaining)
        return tuple(Arc(a, b) for a, b in itertools.pairwise(states))

    @property
    def finished(self) -> bool:
        """Whether no arc is left to execute (target reached, or an arc failed)."""
        return self.next_arc is None

    @property
    def succeeded(self) -> bool:
        """Whether the device reached the target."""
        return not self._failed and not self._remaining

    @property
    def failed(self) -> bool:
        """Whether an arc failed (the SET must then be answered with an error)."""
        return self._failed

    def arc_done(self) -> MigState:
        """Record that :attr:`next_arc` completed; return the new state (the arc's end)."""
        arc = self._require_arc()
        self._state = arc.dst
        self._remaining = self._remaining[1:]
        return self._state

    def arc_failed(self, *, restored: bool) -> MigState:
        """Record that :attr:`next_arc` failed; return the resulting state.

        ``restored``: the device undid the arc's partial effects and is back in the arc's start
        state, which it keeps. Otherwise the device is in no valid state: ERROR.
        """
        self._require_arc()
        self._failed = True
        if not restored:
            self._state = MigState.ERROR
        return self._state

    def _require_arc(self) -> Arc:
        arc = self.next_arc
        if arc is None:
            raise RuntimeError("no arc is pending: the transition is finished")
        return arc


# Commands a device accepts while stopped (STOP) or stopped-and-saving (STOP_COPY), as
# libvfio-user's should_exec_command enforces: region access, DEVICE_FEATURE (to leave the state)
# and MIG_DATA_READ. REGION_WRITE_MULTI is a batch of region writes, so it counts as region access.
_STOPPED_COMMANDS: frozenset[Command] = frozenset(
    {
        Command.REGION_READ,
        Command.REGION_WRITE,
        Command.REGION_WRITE_MULTI,
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
    }
)
_STOPPED_STATES: frozenset[MigState] = frozenset({MigState.STOP, MigState.STOP_COPY})


def command_allowed(state: MigState, command: Command) -> bool:
    """Whether a device in migration ``state`` accepts ``command`` (refused ones get EINVAL).

    * STOP / STOP_COPY: only REGION_READ/WRITE/WRITE_MULTI, DEVICE_FEATURE and MIG_DATA_READ
      (so DMA_MAP/UNMAP, SET_IRQS and DEVICE_RESET are refused while stopped, as libvfio-user
      does).
    * MIG_DATA_READ only in PRE_COPY / STOP_COPY; MIG_DATA_WRITE only in RESUMING.
    * RESUMING, RUNNING, PRE_COPY and ERROR otherwise accept everything. RESUMING must: QEMU
      restores config space (region writes) and re-enables MSI/MSI-X (SET_IRQS) while the
      device is RESUMING, and libvfio-user filters nothing there. ERROR must let DEVICE_RESET
      through, the only way out.

    The rule is applied to every Command mechanically; VERSION and the server-to-client
    DMA_READ/DMA_WRITE are refused while stopped too (a stopped device must not do DMA).
    Raises ValueError for a P2P state: a vfio-user device is never in one.
    """
    if state in P2P_STATES:
        raise ValueError(f"{state.name} is not a vfio-user migration state")
    if command == Command.MIG_DATA_READ:
        return state in SAVING_STATES
    if command == Command.MIG_DATA_WRITE:
        return state == MigState.RESUMING
    if state in _STOPPED_STATES:
        return command in _STOPPED_COMMANDS
    return True


def require_command_allowed(state: MigState, command: Command) -> None:
    """Raise ProtocolError (EINVAL, ``command`` set) unless :func:`command_allowed`."""
    if not command_allowed(state, command):
        raise ProtocolError(
            f"{command.name} is not accepted in migration state {state.name}",
            errno=errno.EINVAL,
            command=command,
        )
