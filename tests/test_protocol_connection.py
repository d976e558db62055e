"""The sans-io connection core, synchronously: one test per rule (no trio, no sockets)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import hypothesis.strategies as st
import pytest
from hypothesis import assume, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from vfiouser_trio.protocol.connection import (
    DISPATCH,
    MSG_ID_SPACE,
    REPLY_CHECKS,
    Close,
    ConnectionClosedError,
    ConnectionCore,
    Ignore,
    ReadAction,
    ReplyArrived,
    ReplyTooManyFds,
    RequestFailed,
    Role,
    SendError,
)
from vfiouser_trio.protocol.constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_COMMAND,
    FLAG_TYPE_REPLY,
    Command,
)
from vfiouser_trio.protocol.errors import ProtocolError, VfioUserError
from vfiouser_trio.protocol.framing import BrokenStream, Frame, OversizedFrame, StrayFds
from vfiouser_trio.protocol.header import Header

READ = int(Command.REGION_READ)
WRITE = int(Command.REGION_WRITE)
VERSION = int(Command.VERSION)


def command(msg_id: int, cmd: int = READ, *, no_reply: bool = False, fds: int = 0) -> Frame:
    flags = FLAG_TYPE_COMMAND | (FLAG_NO_REPLY if no_reply else 0)
    return Frame(Header(msg_id, cmd, 16, flags), b"", _pipe_fds(fds))


def reply(msg_id: int, cmd: int = READ, *, fds: int = 0, error: int | None = None) -> Frame:
    flags = FLAG_TYPE_REPLY | (FLAG_ERROR if error is not None else 0)
    return Frame(Header(msg_id, cmd, 16, flags, error or 0), b"", _pipe_fds(fds))


_opened: list[int] = []


def _pipe_fds(count: int) -> list[int]:
    fds: list[int] = []
    while len(fds) < count:
        fds.extend(os.pipe())
    for extra in fds[count:]:
        os.close(extra)
    _opened.extend(fds[:count])
    return fds[:count]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture(autouse=True)
def _close_leftovers() -> Iterator[None]:
    yield
    for fd in _opened:
        if is_open(fd):
            os.close(fd)
    _opened.clear()


def sent(core: ConnectionCore[object], cmd: int = READ) -> tuple[int, object]:
    """Allocate an ID and register a request, as the engine does before sending it."""
    msg_id = core.allocate_id()
    assert msg_id is not None
    waiter = object()
    core.expect_reply(msg_id, cmd, waiter)
    return msg_id, waiter


# ----------------------------------------------------------------- message IDs


def test_ids_are_handed_out_in_turn_skipping_those_in_use() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    first, _ = sent(core)
    assert first == 0
    core.next_message_id = 0
    assert core.allocate_id() == 1  # 0 awaits its reply


def test_ids_wrap_at_16_bits() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    core.next_message_id = 0xFFFF
    assert core.allocate_id() == 0xFFFF
    assert core.allocate_id() == 0


def test_no_id_while_every_id_is_taken() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    for _ in range(MSG_ID_SPACE):
        sent(core)
    assert core.allocate_id() is None
    assert isinstance(core.receive(reply(5)), ReplyArrived)
    assert core.allocate_id() == 5


# ----------------------------------------------------------------- replies


def test_a_reply_is_matched_by_id_and_keeps_its_fds() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    msg_id, waiter = sent(core)
    frame = reply(msg_id, fds=1)
    event = core.receive(frame)
    assert event == ReplyArrived(waiter, frame)
    assert is_open(frame.fds[0])  # the requester owns them now
    assert core.awaiting_replies == 0


def test_a_reply_naming_another_command_fails_the_request() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    msg_id, waiter = sent(core, READ)
    frame = reply(msg_id, WRITE, fds=1)
    (fd,) = frame.fds
    event = core.receive(frame)
    assert isinstance(event, RequestFailed) and event.waiter is waiter
    assert isinstance(event.error, ProtocolError) and "REGION_WRITE" in str(event.error)
    assert not is_open(fd)


def test_a_reply_on_another_link_than_its_request_closes_the_connection() -> None:
    """Twin sockets: the reply must come on the socket its command went on (the requester
    may be reading that one alone); elsewhere it closes the connection, and the request
    stays pending until then, so that the close fails it."""
    core: ConnectionCore[object] = ConnectionCore()
    twin, main = object(), object()
    msg_id = core.allocate_id()
    assert msg_id is not None
    waiter = object()
    core.expect_reply(msg_id, READ, waiter, twin)
    frame = reply(msg_id, fds=1)
    (fd,) = frame.fds
    event = core.receive(frame, main)
    assert isinstance(event, Close) and event.answer is None
    assert "another socket" in str(event.reason) and event.reason.command == READ
    assert not is_open(fd)
    assert core.close() == [(READ, waiter)]


def test_a_reply_on_the_link_of_its_request_arrives() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    twin = object()
    msg_id = core.allocate_id()
    assert msg_id is not None
    waiter = object()
    core.expect_reply(msg_id, READ, waiter, twin)
    frame = reply(msg_id)
    assert core.receive(frame, twin) == ReplyArrived(waiter, frame)


def test_a_reply_that_answers_nothing_is_dropped_with_a_warning() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    frame = reply(9, fds=1)
    (fd,) = frame.fds
    event = core.receive(frame)
    assert isinstance(event, Ignore) and event.why is not None and "answers nothing" in event.why
    assert not is_open(fd)


def test_the_late_reply_of_a_cancelled_request_is_consumed_silently_and_frees_its_id() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    msg_id, waiter = sent(core)
    assert core.cancel(msg_id, waiter)
    core.next_message_id = msg_id
    assert core.allocate_id() != msg_id  # reserved until the late reply comes
    frame = reply(msg_id, fds=1)
    (fd,) = frame.fds
    assert core.receive(frame) == Ignore()
    assert not is_open(fd)
    assert core.reserved_ids == 0
    core.next_message_id = msg_id
    assert core.allocate_id() == msg_id


def test_cancelling_an_answered_request_reserves_nothing() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    msg_id, waiter = sent(core)
    core.receive(reply(msg_id))
    assert not core.cancel(msg_id, waiter)
    assert core.reserved_ids == 0


# ----------------------------------------------------------------- the reply clock


def test_a_request_is_overdue_at_the_check_after_reply_checks_of_them() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    msg_id, _ = sent(core, WRITE)
    for _ in range(REPLY_CHECKS):
        assert core.overdue() is None
    assert core.overdue() == (msg_id, WRITE)


def test_the_reply_clock_counts_each_request_from_the_first_check_that_saw_it() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    old, _ = sent(core)
    core.overdue()
    core.overdue()
    new, _ = sent(core)
    answered, _ = sent(core)
    for _ in range(REPLY_CHECKS - 2):
        assert core.overdue() is None
    core.receive(reply(answered))
    assert core.overdue() == (old, READ)  # the oldest is named, the others keep counting
    core.receive(reply(old))
    assert core.overdue() is None  # `new` was seen at REPLY_CHECKS checks so far
    assert core.overdue() == (new, READ)


def test_an_answered_or_cancelled_request_stops_counting_and_its_id_starts_afresh() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    first, waiter = sent(core)
    for _ in range(REPLY_CHECKS):
        core.overdue()
    assert core.cancel(first, waiter)
    assert core.overdue() is None  # a cancelled request waits for nothing
    core.receive(reply(first))  # its late reply frees the ID
    core.next_message_id = first
    again, _ = sent(core)
    assert again == first
    for _ in range(REPLY_CHECKS):
        assert core.overdue() is None  # a new request under the same ID
    assert core.overdue() == (first, READ)


def test_an_error_reply_raises_its_errno_and_errno_0_is_eio() -> None:
    with pytest.raises(VfioUserError) as info:
        ConnectionCore.reply_result(reply(1, error=errno.ENOENT), READ)
    assert info.value.errno == errno.ENOENT
    frame = reply(1, error=0, fds=1)
    (fd,) = frame.fds
    with pytest.raises(VfioUserError) as info:
        ConnectionCore.reply_result(frame, READ)
    assert info.value.errno == errno.EIO
    assert not is_open(fd)
    ok = reply(1)
    assert ConnectionCore.reply_result(ok, READ) is ok


# ----------------------------------------------------------------- malformed messages


def test_a_command_is_dispatched() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_recv_fds=2)
    assert core.receive(command(1, fds=2)) is DISPATCH


def test_a_command_with_too_many_fds_is_answered_einval_and_its_fds_closed() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_recv_fds=1)
    frame = command(3, fds=2)
    fds = list(frame.fds)
    event = core.receive(frame)
    assert isinstance(event, SendError) and (event.msg_id, event.errno) == (3, errno.EINVAL)
    assert Header.unpack(event.header()) == Header(3, READ, 16, FLAG_TYPE_REPLY | FLAG_ERROR, 22)
    assert not any(map(is_open, fds))
    no_reply = command(4, fds=2, no_reply=True)
    fds = list(no_reply.fds)
    assert core.receive(no_reply) == Ignore()
    assert not any(map(is_open, fds))


def test_a_message_of_unknown_type_is_answered_einval() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    odd = Frame(Header(2, READ, 16, 0x3), b"")
    event = core.receive(odd)
    assert isinstance(event, SendError) and event.errno == errno.EINVAL


def test_an_oversized_command_is_answered_einval_unless_no_reply() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_msg_size=64)
    event = core.receive_framing_error(OversizedFrame(Header(5, WRITE, 1000)))
    assert isinstance(event, SendError) and (event.msg_id, event.errno) == (5, errno.EINVAL)
    quiet = Header(6, WRITE, 1000, FLAG_TYPE_COMMAND | FLAG_NO_REPLY)
    assert core.receive_framing_error(OversizedFrame(quiet)) == Ignore()


def test_an_oversized_reply_fails_its_request_with_emsgsize() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_msg_size=64)
    msg_id, waiter = sent(core)
    event = core.receive_framing_error(OversizedFrame(Header(msg_id, READ, 1000, FLAG_TYPE_REPLY)))
    assert isinstance(event, RequestFailed) and event.waiter is waiter
    assert event.error.errno == errno.EMSGSIZE
    assert core.awaiting_replies == 0


def test_an_oversized_late_reply_frees_the_reserved_id() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_msg_size=64)
    msg_id, waiter = sent(core)
    core.cancel(msg_id, waiter)
    header = Header(msg_id, READ, 1000, FLAG_TYPE_REPLY)
    assert core.receive_framing_error(OversizedFrame(header)) == Ignore()
    assert core.reserved_ids == 0


def test_a_broken_stream_closes_after_answering_a_command() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    event = core.receive_framing_error(BrokenStream("msg_size 3", Header(7, READ, 3)))
    assert isinstance(event, Close) and isinstance(event.reason, ProtocolError)
    assert event.answer is not None and (event.answer.msg_id, event.answer.errno) == (7, 22)
    as_reply = core.receive_framing_error(BrokenStream("x", Header(7, READ, 3, FLAG_TYPE_REPLY)))
    assert isinstance(as_reply, Close) and as_reply.answer is None
    quiet = Header(7, READ, 3, FLAG_TYPE_COMMAND | FLAG_NO_REPLY)
    event = core.receive_framing_error(BrokenStream("x", quiet))
    assert isinstance(event, Close) and event.answer is None


def test_stray_fds_are_worth_a_warning() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    event = core.receive_framing_error(StrayFds(2))
    assert isinstance(event, Ignore) and event.why is not None and "2 fds" in event.why


# ----------------------------------------------------------------- answering commands


def test_a_no_reply_command_is_never_answered() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    header = command(1, no_reply=True).header
    assert core.reply_header(header, 4, 0) is None
    assert core.error_reply_header(header, VfioUserError(errno.EINVAL)) is None
    assert core.error_reply_header(header, RuntimeError()) is None


def test_a_reply_header_carries_id_command_and_size() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    raw = core.reply_header(command(9, WRITE).header, 4, 0)
    assert raw is not None and Header.unpack(raw) == Header(9, WRITE, 20, FLAG_TYPE_REPLY)


def test_a_handler_error_is_its_errno_and_anything_else_eio() -> None:
    header = command(2).header
    raw = ConnectionCore.error_reply_header(header, VfioUserError(errno.ENOSPC))
    assert raw is not None and Header.unpack(raw).error == errno.ENOSPC
    raw = ConnectionCore.error_reply_header(header, KeyError("bug"))
    assert raw is not None and Header.unpack(raw).error == errno.EIO


def test_a_reply_with_more_fds_than_the_peer_accepts_is_refused() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_send_fds=1)
    with pytest.raises(ReplyTooManyFds) as info:
        core.reply_header(command(1).header, 0, 2)
    assert info.value.errno == errno.EINVAL


# ----------------------------------------------------------------- VERSION first


def test_a_server_refuses_every_command_before_version() -> None:
    core: ConnectionCore[object] = ConnectionCore(role=Role.SERVER)
    with pytest.raises(VfioUserError, match="first") as info:
        core.admit(command(0, READ).header)
    assert info.value.errno == errno.EINVAL
    core.admit(command(0, VERSION).header)


def test_a_failed_version_leaves_the_server_unnegotiated() -> None:
    core: ConnectionCore[object] = ConnectionCore(role=Role.SERVER)
    core.admit(command(0, VERSION).header)  # ... and its handler raised: no reply_header
    assert not core.negotiated
    core.admit(command(1, VERSION).header)  # the client may try again


def test_a_server_refuses_a_second_version() -> None:
    core: ConnectionCore[object] = ConnectionCore(role=Role.SERVER)
    version = command(0, VERSION).header
    core.admit(version)
    core.reply_header(version, 10, 0)
    assert core.negotiated
    core.admit(command(1, READ).header)
    with pytest.raises(VfioUserError, match="after negotiation"):
        core.admit(command(2, VERSION).header)


def test_a_peer_has_no_version_rule() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    core.admit(command(0, READ).header)
    core.admit(command(1, VERSION).header)


# ----------------------------------------------------------------- requests and closing


def test_a_request_with_more_fds_than_the_peer_accepts_is_refused() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_send_fds=2)
    core.check_request(READ, 2)
    with pytest.raises(ProtocolError, match="limit of 2"):
        core.check_request(READ, 3)


def test_closing_hands_back_every_waiter_and_refuses_what_comes_after() -> None:
    core: ConnectionCore[object] = ConnectionCore()
    _, w1 = sent(core, READ)
    two, w2 = sent(core, WRITE)
    core.cancel(two, w2)
    assert core.close() == [(READ, w1)]
    assert core.reserved_ids == 0
    with pytest.raises(ConnectionClosedError) as info:
        core.check_request(READ, 0)
    assert info.value.errno == errno.ENOTCONN
    frame = command(3, fds=1)
    (fd,) = frame.fds
    assert core.receive(frame) == Ignore()
    assert not is_open(fd)


# ----------------------------------------------------------------- bounded memory


def test_a_reader_pauses_at_the_mark_and_resumes_below_half() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_send_backlog=1000)
    action = core.read_action
    assert action(core.pressure(999, 0), paused=False, awaited=False) is ReadAction.READ
    assert action(core.pressure(1000, 0), paused=False, awaited=False) is ReadAction.PAUSE
    assert action(core.pressure(600, 0), paused=True, awaited=False) is ReadAction.PAUSE
    assert action(core.pressure(499, 0), paused=True, awaited=False) is ReadAction.READ


def test_a_link_awaiting_a_reply_reads_on_to_twice_the_mark_then_closes() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_send_backlog=1000)
    assert core.read_action(core.pressure(1999, 0), paused=False, awaited=True) is ReadAction.READ
    assert core.read_action(core.pressure(2000, 0), paused=False, awaited=True) is ReadAction.CLOSE


def test_held_fds_count_as_pressure() -> None:
    core: ConnectionCore[object] = ConnectionCore(
        max_send_backlog=1000, dispatch_batch=2, max_recv_fds=4
    )
    assert core.pressure(0, 8) == 1.0
    assert ConnectionCore().pressure(10**9, 10**6) == 0.0  # unbounded


def test_a_bounded_read_shrinks_near_the_mark() -> None:
    core: ConnectionCore[object] = ConnectionCore(max_send_backlog=1 << 20)
    assert core.read_budget(0, 4096) == (1 << 20) * 16 // (256 + 16)
    assert core.read_budget(1 << 20, 4096) == 4096


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_send_backlog"):
        ConnectionCore(max_send_backlog=0)
    with pytest.raises(ValueError, match="dispatch_batch"):
        ConnectionCore(dispatch_batch=0)


# ----------------------------------------------------------------- state machine


class RequestsAndReplies(RuleBasedStateMachine):
    """Requests sent, answered, cancelled and answered late, in any order: every reply
    reaches its own waiter, a cancelled request's reply is consumed silently, and no ID is
    ever held twice."""

    awaiting = Bundle("awaiting")
    cancelled = Bundle("cancelled")

    def __init__(self) -> None:
        super().__init__()
        self.core: ConnectionCore[object] = ConnectionCore()
        self.live: dict[int, object] = {}
        self.reserved: set[int] = set()

    @rule(target=awaiting, start=st.integers(0, 0xFFFF))
    def send(self, start: int) -> tuple[int, object]:
        self.core.next_message_id = start
        msg_id, waiter = sent(self.core)
        assert msg_id not in self.live and msg_id not in self.reserved
        self.live[msg_id] = waiter
        return msg_id, waiter

    @rule(request=consumes(awaiting))
    def answer(self, request: tuple[int, object]) -> None:
        msg_id, waiter = request
        event = self.core.receive(reply(msg_id))
        assert isinstance(event, ReplyArrived) and event.waiter is waiter
        del self.live[msg_id]

    @rule(target=cancelled, request=consumes(awaiting))
    def cancel(self, request: tuple[int, object]) -> int:
        msg_id, waiter = request
        assert self.core.cancel(msg_id, waiter)
        del self.live[msg_id]
        self.reserved.add(msg_id)
        return msg_id

    @rule(msg_id=consumes(cancelled))
    def late_reply(self, msg_id: int) -> None:
        assert self.core.receive(reply(msg_id)) == Ignore()
        self.reserved.discard(msg_id)

    @rule(msg_id=st.integers(0, 0xFFFF))
    def stray_reply(self, msg_id: int) -> None:
        assume(msg_id not in self.live and msg_id not in self.reserved)
        event = self.core.receive(reply(msg_id))
        assert isinstance(event, Ignore) and event.why is not None

    @invariant()
    def counts_match(self) -> None:
        assert self.core.awaiting_replies == len(self.live)
        assert self.core.reserved_ids == len(self.reserved)


TestRequestsAndReplies = RequestsAndReplies.TestCase
TestRequestsAndReplies.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_a_link_yields_every_dispatch_batch_commands_unless_a_cut_hook_decides() -> None:
    core: ConnectionCore[object] = ConnectionCore(dispatch_batch=4)
    header = command(1).header
    # Without a hook the engine asks only once a link started dispatch_batch commands.
    assert core.cut_hook is None and core.cut_check == 4
    assert not core.cut_before(3, header) and core.cut_before(4, header)
    # A reader alone in its process has no other peer to starve: its reads yield.
    assert not core.cut_before(4, header, alone=True)
    asked: list[tuple[int, int]] = []

    def hook(started: int, next_command: Header) -> bool:
        asked.append((started, next_command.msg_id))
        return started == 1

    core.cut_hook = hook
    assert core.cut_check == 0  # asked before every command
    assert [core.cut_before(n, header) for n in (0, 1, 4)] == [False, True, False]
    assert core.cut_before(1, header, alone=True)  # the hook decides regardless
    assert asked == [(0, 1), (1, 1), (4, 1), (1, 1)]
    core.cut_hook = None
    assert core.cut_check == 4 and core.cut_before(4, header)
