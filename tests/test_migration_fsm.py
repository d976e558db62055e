"""Migration FSM: paths against hand-written tables, refusals, the Transition driver, command gate.

The expected tables below are written by hand from the spec's rules (direct arcs; shortest path;
no saving-group state inside a path; STOP_COPY -> PRE_COPY forbidden), then cross-checked with
Linux's vfio_mig_get_next_state and libvfio-user's next_state table with P2P steps skipped.
"""

from __future__ import annotations

import errno
import itertools

import pytest

from vfiouser_trio.protocol import migration_fsm
from vfiouser_trio.protocol.constants import (
    MIGRATION_P2P,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    Command,
    MigState,
)
from vfiouser_trio.protocol.errors import ProtocolError, VfioUserError
from vfiouser_trio.protocol.migration_fsm import (
    Arc,
    MigrationFsm,
    command_allowed,
    require_command_allowed,
)

ERROR = MigState.ERROR
STOP = MigState.STOP
RUNNING = MigState.RUNNING
STOP_COPY = MigState.STOP_COPY
RESUMING = MigState.RESUMING
RUNNING_P2P = MigState.RUNNING_P2P
PRE_COPY = MigState.PRE_COPY
PRE_COPY_P2P = MigState.PRE_COPY_P2P

ALL_STATES = list(MigState)
assert len(ALL_STATES) == 8

WITH_PRE_COPY = MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
WITHOUT_PRE_COPY = MIGRATION_STOP_COPY

# The spec's direct arcs, copied by hand from "Direct State Transitions".
SPEC_ARCS = {
    (RUNNING, STOP),
    (STOP_COPY, STOP),
    (RESUMING, STOP),
    (PRE_COPY, RUNNING),
    (STOP, RUNNING),
    (RUNNING, PRE_COPY),
    (STOP, STOP_COPY),
    (PRE_COPY, STOP_COPY),
    (STOP, RESUMING),
}
SAVING = {PRE_COPY, STOP_COPY}

# Every allowed (current, target) of a device without PRE_COPY; anything absent is refused.
EXPECTED_WITHOUT_PRE_COPY: dict[tuple[MigState, MigState], tuple[MigState, ...]] = {
    (STOP, STOP): (),
    (STOP, RUNNING): (RUNNING,),
    (STOP, STOP_COPY): (STOP_COPY,),
    (STOP, RESUMING): (RESUMING,),
    (RUNNING, STOP): (STOP,),
    (RUNNING, RUNNING): (),
    (RUNNING, STOP_COPY): (STOP, STOP_COPY),
    (RUNNING, RESUMING): (STOP, RESUMING),
    (STOP_COPY, STOP): (STOP,),
    (STOP_COPY, RUNNING): (STOP, RUNNING),
    (STOP_COPY, STOP_COPY): (),
    (STOP_COPY, RESUMING): (STOP, RESUMING),
    (RESUMING, STOP): (STOP,),
    (RESUMING, RUNNING): (STOP, RUNNING),
    (RESUMING, STOP_COPY): (STOP, STOP_COPY),
    (RESUMING, RESUMING): (),
}

# With PRE_COPY the paths above do not change (none of them could use PRE_COPY: it would be
# interior), and these are added. STOP_COPY -> PRE_COPY stays refused.
EXPECTED_WITH_PRE_COPY: dict[tuple[MigState, MigState], tuple[MigState, ...]] = {
    **EXPECTED_WITHOUT_PRE_COPY,
    (STOP, PRE_COPY): (RUNNING, PRE_COPY),
    (RUNNING, PRE_COPY): (PRE_COPY,),
    (RESUMING, PRE_COPY): (STOP, RUNNING, PRE_COPY),
    (PRE_COPY, PRE_COPY): (),
    (PRE_COPY, RUNNING): (RUNNING,),
    (PRE_COPY, STOP_COPY): (STOP_COPY,),
    # Not (STOP_COPY, STOP): STOP_COPY would be interior. Same length via RUNNING.
    (PRE_COPY, STOP): (RUNNING, STOP),
    # Not (STOP_COPY, STOP, RESUMING), for the same reason.
    (PRE_COPY, RESUMING): (RUNNING, STOP, RESUMING),
}

CASES = [
    pytest.param(WITH_PRE_COPY, EXPECTED_WITH_PRE_COPY, id="pre_copy"),
    pytest.param(WITHOUT_PRE_COPY, EXPECTED_WITHOUT_PRE_COPY, id="no_pre_copy"),
]


def assert_einval(exc_info: pytest.ExceptionInfo[ProtocolError]) -> None:
    assert isinstance(exc_info.value, VfioUserError)
    assert exc_info.value.errno == errno.EINVAL
    assert exc_info.value.command == Command.DEVICE_FEATURE


# --- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), CASES)
def test_every_pair_matches_the_hand_table(
    flags: int, expected: dict[tuple[MigState, MigState], tuple[MigState, ...]]
) -> None:
    fsm = MigrationFsm(flags)
    refused = 0
    for current, target in itertools.product(ALL_STATES, repeat=2):
        if (current, target) in expected:
            assert fsm.path(current, target) == expected[current, target], (current, target)
        else:
            refused += 1
            with pytest.raises(ProtocolError) as exc_info:
                fsm.path(current, target)
            assert_einval(exc_info)
    assert refused == 64 - len(expected)


def test_the_refusals_the_spec_names() -> None:
    fsm = MigrationFsm(WITH_PRE_COPY)
    refused = [
        (STOP_COPY, PRE_COPY),  # explicitly not allowed, though STOP->RUNNING->PRE_COPY exists
        (RUNNING, ERROR),  # ERROR cannot be requested...
        (ERROR, ERROR),  # ...not even from ERROR
        (ERROR, RUNNING),  # only DEVICE_RESET leaves ERROR
        (RUNNING, RUNNING_P2P),
        (RUNNING_P2P, RUNNING_P2P),
        (PRE_COPY, PRE_COPY_P2P),
        (PRE_COPY_P2P, STOP),
    ]
    for current, target in refused:
        with pytest.raises(ProtocolError) as exc_info:
            fsm.path(current, target)
        assert_einval(exc_info)


@pytest.mark.parametrize(("flags", "expected"), CASES)
def test_paths_walk_direct_arcs_without_saving_states_inside(
    flags: int, expected: dict[tuple[MigState, MigState], tuple[MigState, ...]]
) -> None:
    fsm = MigrationFsm(flags)
    for current, target in expected:
        path = fsm.path(current, target)
        walk = (current, *path)
        assert walk[-1] == target
        for a, b in itertools.pairwise(walk):
            assert (a, b) in SPEC_ARCS
            assert fsm.is_direct_arc(a, b)
        assert not SAVING & set(walk[1:-1]), (current, target, path)


def brute_force_shortest(
    current: MigState, target: MigState, states: set[MigState]
) -> list[tuple[MigState, ...]]:
    """All shortest valid paths, by enumerating every simple walk over SPEC_ARCS."""
    arcs = {(a, b) for a, b in SPEC_ARCS if a in states and b in states}
    found: list[tuple[MigState, ...]] = []
    walks: list[tuple[MigState, ...]] = [(current,)]
    while walks and not found:
        longer = []
        for walk in walks:
            for a, b in arcs:
                if a != walk[-1] or b in walk:
                    continue
                if len(walk) > 1 and walk[-1] in SAVING:
                    continue  # would put a saving state in the interior
                longer.append((*walk, b))
        found = [w[1:] for w in longer if w[-1] == target]
        walks = longer
    return found


@pytest.mark.parametrize(("flags", "expected"), CASES)
def test_non_trivial_paths_are_the_unique_shortest_ones(
    flags: int, expected: dict[tuple[MigState, MigState], tuple[MigState, ...]]
) -> None:
    fsm = MigrationFsm(flags)
    for (current, target), path in expected.items():
        if current == target:
            continue
        assert brute_force_shortest(current, target, set(fsm.supported_states)) == [path]
        assert fsm.path(current, target) == path


def test_without_the_explicit_rule_stop_copy_to_pre_copy_would_have_a_path() -> None:
    # Documents why the refusal is needed: the arcs alone allow it.
    states = {STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY}
    assert brute_force_shortest(STOP_COPY, PRE_COPY, states) == [(STOP, RUNNING, PRE_COPY)]


def test_raw_wire_values_are_accepted_and_unknown_ones_refused() -> None:
    fsm = MigrationFsm(WITH_PRE_COPY)
    assert fsm.path(RUNNING, 3) == (STOP, STOP_COPY)
    for raw in (8, 9, 0xFFFFFFFF, -1):
        with pytest.raises(ProtocolError) as exc_info:
            fsm.path(RUNNING, raw)
        assert_einval(exc_info)


def test_paths_come_from_a_precomputed_table(monkeypatch: pytest.MonkeyPatch) -> None:
    fsms = [MigrationFsm(WITH_PRE_COPY), MigrationFsm(WITHOUT_PRE_COPY)]

    def no_search(*args: object) -> None:
        raise AssertionError("path() searched the graph")

    monkeypatch.setattr(migration_fsm, "deque", no_search)
    fsms.append(MigrationFsm(WITH_PRE_COPY | MIGRATION_P2P))  # same capability: cached table
    for fsm in fsms:
        for current, target in itertools.product(fsm.supported_states, repeat=2):
            if (current, target) != (STOP_COPY, PRE_COPY):
                fsm.path(current, target)


# --- capabilities -----------------------------------------------------------------------------


def test_supported_states_and_arcs() -> None:
    with_pc = MigrationFsm(WITH_PRE_COPY)
    without_pc = MigrationFsm(WITHOUT_PRE_COPY)
    assert with_pc.supported_states == {STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY}
    assert without_pc.supported_states == {STOP, RUNNING, STOP_COPY, RESUMING}
    assert with_pc.supports_pre_copy
    assert not without_pc.supports_pre_copy
    assert with_pc.flags == WITH_PRE_COPY
    assert {tuple(arc) for arc in with_pc.arcs} == SPEC_ARCS
    assert {tuple(arc) for arc in without_pc.arcs} == {
        (RUNNING, STOP),
        (STOP_COPY, STOP),
        (RESUMING, STOP),
        (STOP, RUNNING),
        (STOP, STOP_COPY),
        (STOP, RESUMING),
    }


@pytest.mark.parametrize("flags", [WITH_PRE_COPY, WITHOUT_PRE_COPY])
def test_is_direct_arc_for_every_pair(flags: int) -> None:
    fsm = MigrationFsm(flags)
    for a, b in itertools.product(ALL_STATES, repeat=2):
        expected = (a, b) in SPEC_ARCS and (fsm.supports_pre_copy or PRE_COPY not in (a, b))
        assert fsm.is_direct_arc(a, b) == expected, (a, b)


def test_p2p_flag_is_ignored_and_p2p_states_stay_refused() -> None:
    fsm = MigrationFsm(MIGRATION_STOP_COPY | MIGRATION_P2P)
    assert fsm.supported_states == {STOP, RUNNING, STOP_COPY, RESUMING}
    assert fsm.path(RUNNING, STOP_COPY) == (STOP, STOP_COPY)
    with pytest.raises(ProtocolError):
        fsm.path(RUNNING, RUNNING_P2P)


@pytest.mark.parametrize("flags", [0, MIGRATION_PRE_COPY, MIGRATION_P2P])
def test_stop_copy_capability_is_required(flags: int) -> None:
    with pytest.raises(ValueError, match="MIGRATION_STOP_COPY"):
        MigrationFsm(flags)


# --- Transition driver ------------------------------------------------------------------------


def test_transition_walks_every_arc_to_the_target() -> None:
    tr = MigrationFsm(WITH_PRE_COPY).transition(RESUMING, PRE_COPY)
    assert tr.state == RESUMING
    assert tr.target == PRE_COPY
    assert tr.remaining_arcs == (
        Arc(RESUMING, STOP),
        Arc(STOP, RUNNING),
        Arc(RUNNING, PRE_COPY),
    )
    executed = []
    while (arc := tr.next_arc) is not None:
        executed.append(arc)
        assert tr.arc_done() == arc.dst
        assert tr.state == arc.dst
    assert executed == [(RESUMING, STOP), (STOP, RUNNING), (RUNNING, PRE_COPY)]
    assert tr.state == PRE_COPY
    assert tr.succeeded
    assert tr.finished
    assert not tr.failed
    assert len(tr.remaining_arcs) == 0


def test_transition_to_the_current_state_has_no_arcs() -> None:
    tr = MigrationFsm(WITH_PRE_COPY).transition(STOP, STOP)
    assert tr.next_arc is None
    assert tr.succeeded
    assert tr.state == STOP
    assert tr.target == STOP


def test_failed_arc_that_was_undone_keeps_the_last_state_reached() -> None:
    tr = MigrationFsm(WITH_PRE_COPY).transition(PRE_COPY, RESUMING)
    assert tr.arc_done() == RUNNING
    assert tr.arc_done() == STOP
    assert tr.next_arc == Arc(STOP, RESUMING)
    assert tr.arc_failed(restored=True) == STOP
    assert tr.state == STOP
    assert tr.failed
    assert tr.finished
    assert not tr.succeeded
    assert tr.next_arc is None
    assert tr.remaining_arcs == ()


def test_failed_first_arc_that_was_undone_keeps_the_start_state() -> None:
    tr = MigrationFsm(WITHOUT_PRE_COPY).transition(RUNNING, STOP_COPY)
    assert tr.arc_failed(restored=True) == RUNNING
    assert tr.state == RUNNING


def test_failed_arc_that_could_not_be_undone_leads_to_error() -> None:
    tr = MigrationFsm(WITH_PRE_COPY).transition(RUNNING, STOP_COPY)
    assert tr.arc_done() == STOP
    assert tr.arc_failed(restored=False) == ERROR
    assert tr.state == ERROR
    assert tr.failed


def test_no_arc_may_be_reported_once_finished() -> None:
    done = MigrationFsm(WITH_PRE_COPY).transition(RUNNING, STOP)
    done.arc_done()
    failed = MigrationFsm(WITH_PRE_COPY).transition(RUNNING, STOP)
    failed.arc_failed(restored=True)
    for tr in (done, failed):
        with pytest.raises(RuntimeError):
            tr.arc_done()
        with pytest.raises(RuntimeError):
            tr.arc_failed(restored=False)
    assert done.state == STOP
    assert failed.state == RUNNING


def test_error_is_left_only_through_reset() -> None:
    fsm = MigrationFsm(WITH_PRE_COPY)
    tr = fsm.transition(RUNNING, STOP)
    state = tr.arc_failed(restored=False)
    assert state == ERROR
    for target in ALL_STATES:
        with pytest.raises(ProtocolError) as exc_info:
            fsm.transition(state, target)
        assert_einval(exc_info)
    state = fsm.after_reset()
    assert state == RUNNING
    assert fsm.transition(state, STOP_COPY).remaining_arcs == (
        Arc(RUNNING, STOP),
        Arc(STOP, STOP_COPY),
    )


def test_refused_transition_cannot_be_started() -> None:
    with pytest.raises(ProtocolError) as exc_info:
        MigrationFsm(WITH_PRE_COPY).transition(STOP_COPY, PRE_COPY)
    assert_einval(exc_info)
    with pytest.raises(ProtocolError):
        MigrationFsm(WITHOUT_PRE_COPY).transition(RUNNING, PRE_COPY)


# --- command gate -----------------------------------------------------------------------------

C = Command
EVERYTHING = set(Command)
# Written out per state from the spec's migration section and the decisions in migration_fsm.py.
ALLOWED: dict[MigState, set[Command]] = {
    STOP: {C.REGION_READ, C.REGION_WRITE, C.REGION_WRITE_MULTI, C.DEVICE_FEATURE},
    STOP_COPY: {
        C.REGION_READ,
        C.REGION_WRITE,
        C.REGION_WRITE_MULTI,
        C.DEVICE_FEATURE,
        C.MIG_DATA_READ,
    },
    RUNNING: EVERYTHING - {C.MIG_DATA_READ, C.MIG_DATA_WRITE},
    PRE_COPY: EVERYTHING - {C.MIG_DATA_WRITE},
    RESUMING: EVERYTHING - {C.MIG_DATA_READ},
    ERROR: EVERYTHING - {C.MIG_DATA_READ, C.MIG_DATA_WRITE},
}


@pytest.mark.parametrize("state", list(ALLOWED))
def test_command_allowed_for_every_command(state: MigState) -> None:
    for command in Command:
        expected = command in ALLOWED[state]
        assert command_allowed(state, command) == expected, (state, command)
        if expected:
            require_command_allowed(state, command)
        else:
            with pytest.raises(ProtocolError) as exc_info:
                require_command_allowed(state, command)
            assert exc_info.value.errno == errno.EINVAL
            assert exc_info.value.command == command


def test_key_command_gate_facts() -> None:
    # Spelled out, so a wrong ALLOWED table above cannot hide them.
    assert not command_allowed(STOP, Command.DMA_MAP)
    assert not command_allowed(STOP_COPY, Command.DEVICE_SET_IRQS)
    assert not command_allowed(STOP, Command.MIG_DATA_READ)
    assert command_allowed(STOP_COPY, Command.MIG_DATA_READ)
    assert command_allowed(PRE_COPY, Command.MIG_DATA_READ)
    assert command_allowed(RESUMING, Command.MIG_DATA_WRITE)
    assert command_allowed(RESUMING, Command.DEVICE_SET_IRQS)
    assert command_allowed(RESUMING, Command.REGION_WRITE)
    assert command_allowed(ERROR, Command.DEVICE_RESET)
    assert not command_allowed(STOP, Command.DEVICE_RESET)


@pytest.mark.parametrize("state", [RUNNING_P2P, PRE_COPY_P2P])
def test_command_allowed_rejects_p2p_states(state: MigState) -> None:
    with pytest.raises(ValueError, match="not a vfio-user migration state"):
        command_allowed(state, Command.REGION_READ)
