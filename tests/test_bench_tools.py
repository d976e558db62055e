"""Smoke tests of the C benchmark tools in bench/: they compile, speak vfio-user correctly, catch
protocol errors, and report well-formed figures. Timings are never asserted here."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import baselines, cbuild
from bench.baselines import BenchToolError, LoadMode
from tests.fd_leaks import fd_count
from vfiouser_trio.protocol.constants import FLAG_ERROR, FLAG_TYPE_REPLY, HEADER_SIZE, Command
from vfiouser_trio.protocol.header import Header, command_header, reply_header

if shutil.which("gcc") is None:
    pytest.skip("the C benchmark tools need gcc", allow_module_level=True)

TOOLS = ("vfu_loadgen", "vfu_echo", "pingpong", "memcpy_bw")
RW_HEAD = struct.Struct("=QII")  # offset, region, count
VERSION_HEAD = struct.Struct("=HH")  # major, minor
#: A tool that stalls (a lost reply) fails the test after this long instead of the default 120 s.
STALL_TIMEOUT = 20.0


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = fd_count()
    yield
    assert fd_count() == before


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """Exactly ``size`` bytes, or None on EOF before the first byte."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            if chunks:
                raise AssertionError("EOF inside a message")
            return None
        chunks += chunk
    return bytes(chunks)


def recv_message(sock: socket.socket) -> tuple[Header, bytes] | None:
    raw = recv_exact(sock, HEADER_SIZE)
    if raw is None:
        return None
    hdr = Header.unpack(raw)
    payload = recv_exact(sock, hdr.payload_size) if hdr.payload_size else b""
    assert payload is not None
    return hdr, payload


# --- compile helper ---------------------------------------------------------------------------


def test_compile_is_cached_and_keyed_on_source(tmp_path: Path) -> None:
    src = tmp_path / "tool.c"
    build = tmp_path / "build"
    src.write_text("int main(void) { return 3; }\n")
    first = cbuild.compile_c(src, build)
    mtime = first.stat().st_mtime_ns
    assert cbuild.compile_c(src, build) == first
    assert first.stat().st_mtime_ns == mtime  # reused, not rebuilt

    src.write_text("int main(void) { return 4; }\n")
    second = cbuild.compile_c(src, build)
    assert second != first
    assert not first.exists()  # the stale build is pruned
    assert sorted(p.name for p in build.iterdir()) == [second.name]
    assert subprocess.run([second], check=False).returncode == 4


def test_compile_error_carries_gcc_diagnostics(tmp_path: Path) -> None:
    src = tmp_path / "broken.c"
    src.write_text("int main(void) { return undeclared_name; }\n")
    with pytest.raises(cbuild.CompileError, match="undeclared_name"):
        cbuild.compile_c(src, tmp_path)
    assert list(tmp_path.iterdir()) == [src]  # no half-built binary left behind


@pytest.mark.parametrize("name", TOOLS)
def test_tools_compile_without_warnings(name: str, tmp_path: Path) -> None:
    source = cbuild.C_SOURCE_DIR / f"{name}.c"
    binary = cbuild.compile_c(source, tmp_path, (*cbuild.CFLAGS, "-Werror"))
    assert os.access(binary, os.X_OK)
    assert os.access(cbuild.tool_path(name), os.X_OK)


def test_unknown_tool_is_reported() -> None:
    with pytest.raises(FileNotFoundError):
        cbuild.tool_path("no_such_tool")


# --- baselines without a server ------------------------------------------------------------------


@pytest.mark.parametrize("run", [baselines.run_pingpong, baselines.run_eventfd_pingpong])
def test_pingpong_counts_round_trips(run: Callable[..., baselines.LatencyResult]) -> None:
    result = run(count=200)
    assert result.tool == "pingpong"
    assert result.round_trips == result.messages == 200
    assert result.seconds > 0
    assert result.round_trips_per_s > 0
    assert 0 < result.median_us <= result.p99_us


def test_pingpong_modes_are_distinct() -> None:
    assert baselines.run_pingpong(count=10).mode == "unix"
    assert baselines.run_eventfd_pingpong(count=10).mode == "eventfd"


def test_pingpong_seconds_bound() -> None:
    result = baselines.run_pingpong(seconds=0.02)
    assert result.round_trips > 0
    assert result.seconds >= 0.02


def test_memcpy_reports_each_size() -> None:
    results = baselines.run_memcpy([4096, 65536], seconds_per_size=0.02)
    assert [r.size for r in results] == [4096, 65536]
    for r in results:
        assert r.mb_per_s > 0
        assert r.bytes_copied > 0
        assert r.bytes_copied % r.size == 0
        assert r.seconds > 0


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="not both"):
        baselines.run_pingpong(seconds=1.0, count=10)
    with pytest.raises(ValueError, match="positive"):
        baselines.run_pingpong(count=0)
    with pytest.raises(ValueError, match="pipeline"):
        baselines.run_loadgen("/nonexistent", LoadMode.READ, depth=8, count=1)


# --- the C echo server ---------------------------------------------------------------------------


def test_echo_server_answers_like_a_vfio_user_server(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "echo.sock"
    with baselines.start_echo_server(path) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            body = VERSION_HEAD.pack(0, 0) + b'{"capabilities":{"max_msg_fds":8}}\0'
            sock.sendall(command_header(7, Command.VERSION, len(body)).pack() + body)
            reply = recv_message(sock)
            assert reply is not None
            hdr, payload = reply
            assert (hdr.msg_id, hdr.command, hdr.flags) == (7, Command.VERSION, FLAG_TYPE_REPLY)
            assert VERSION_HEAD.unpack_from(payload) == (0, 0)
            assert payload.endswith(b"\0")
            assert b'"max_data_xfer_size":1048576' in payload

            # A posted write gets no reply: the next reply is the read's, with the data.
            data = b"\x11\x22\x33\x44"
            write = RW_HEAD.pack(8, 2, len(data)) + data
            sock.sendall(command_header(8, Command.REGION_WRITE, len(write), no_reply=True).pack())
            sock.sendall(write)
            read = RW_HEAD.pack(6, 2, 8)
            sock.sendall(command_header(9, Command.REGION_READ, len(read)).pack() + read)
            reply = recv_message(sock)
            assert reply is not None
            hdr, payload = reply
            assert (hdr.msg_id, hdr.command, hdr.msg_size) == (9, Command.REGION_READ, 16 + 24)
            assert payload == RW_HEAD.pack(6, 2, 8) + b"\0\0" + data + b"\0\0"

            write = RW_HEAD.pack(0, 0, 2) + b"ab"
            sock.sendall(command_header(10, Command.REGION_WRITE, len(write)).pack() + write)
            reply = recv_message(sock)
            assert reply is not None
            assert reply[0].msg_size == HEADER_SIZE + 16
            assert reply[1] == RW_HEAD.pack(0, 0, 2)

            # Out of range, and an unsupported command: header-only EINVAL replies.
            for msg_id, command, body in [
                (11, Command.REGION_READ, RW_HEAD.pack(1 << 20, 0, 1)),
                (12, Command.DEVICE_GET_INFO, struct.pack("=IIII", 16, 0, 0, 0)),
            ]:
                sock.sendall(command_header(msg_id, command, len(body)).pack() + body)
                reply = recv_message(sock)
                assert reply is not None
                assert reply[0] == Header(
                    msg_id, command, HEADER_SIZE, FLAG_TYPE_REPLY | FLAG_ERROR, errno.EINVAL
                )
        assert server.wait() == 0  # it served its one client and left
        assert not path.exists()
    assert server.process.returncode == 0


def test_echo_server_close_stops_it_and_removes_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    server = baselines.start_echo_server(path, clients=0)
    assert path.exists()
    server.close()
    assert server.process.returncode is not None
    assert not path.exists()


def test_echo_server_start_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(BenchToolError, match="bind"):
        baselines.start_echo_server(tmp_path / "missing-dir" / "echo.sock")


# --- the load generator against the C echo server ------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "depth", "batch", "size"),
    [
        (LoadMode.READ, 1, 16, 4),
        (LoadMode.PIPELINE, 1, 16, 4),
        (LoadMode.PIPELINE, 8, 16, 4),
        (LoadMode.PIPELINE, 64, 16, 4),
        (LoadMode.PIPELINE, 8, 16, 65536),
        (LoadMode.POSTED, 1, 8, 4),
        (LoadMode.POSTED, 1, 4, 4096),
    ],
)
def test_loadgen_against_echo(
    tmp_path: Path, mode: LoadMode, depth: int, batch: int, size: int
) -> None:
    with baselines.start_echo_server(tmp_path / "echo.sock") as server:
        result = baselines.run_loadgen(
            server.path,
            mode,
            depth=depth,
            batch=batch,
            count=200,
            region=1,
            offset=64,
            size=size,
            timeout=STALL_TIMEOUT,
        )
        assert server.wait() == 0  # the server saw nothing it had to reject
    assert (result.tool, result.mode, result.size, result.region, result.offset) == (
        "vfu_loadgen",
        mode.value,
        size,
        1,
        64,
    )
    assert result.round_trips == 200
    if mode is LoadMode.POSTED:
        assert (result.depth, result.batch, result.messages) == (1, batch, 200 * (batch + 1))
    else:
        assert (result.depth, result.batch, result.messages) == (depth, 0, 200)
    assert result.seconds > 0
    assert result.round_trips_per_s > 0
    assert result.messages_per_s > 0
    assert result.mb_per_s > 0
    assert 0 < result.median_us <= result.p99_us


def test_loadgen_seconds_bound() -> None:
    with baselines.echo_server() as server:
        result = baselines.run_loadgen(server.path, LoadMode.PIPELINE, depth=8, seconds=0.02)
    assert result.round_trips > 0
    assert result.seconds >= 0.02


def test_loadgen_reports_server_errors(tmp_path: Path) -> None:
    with (
        baselines.start_echo_server(tmp_path / "echo.sock") as server,
        pytest.raises(BenchToolError, match=r"errno 22"),
    ):
        baselines.run_loadgen(server.path, count=10, offset=(1 << 20) - 2, size=4)


def test_loadgen_connect_failure(tmp_path: Path) -> None:
    with pytest.raises(BenchToolError, match="connect"):
        baselines.run_loadgen(tmp_path / "nobody.sock", count=1)


# --- the load generator's reply checks, against a scripted Python server ------------------------

Answer = Callable[[Header, bytes], bytes]


def good_answer(hdr: Header, payload: bytes) -> bytes:
    """A correct reply (empty for No_reply commands)."""
    if hdr.no_reply:
        return b""
    if hdr.command == Command.VERSION:
        body = VERSION_HEAD.pack(0, 0) + b'{"capabilities":{}}\0'
    elif hdr.command == Command.REGION_READ:
        count = RW_HEAD.unpack_from(payload)[2]
        body = payload[: RW_HEAD.size] + bytes(count)
    else:
        body = payload[: RW_HEAD.size]
    return reply_header(hdr.msg_id, hdr.command, len(body)).pack() + body


def on_reads(bad: Answer) -> Answer:
    """Answer correctly, except REGION_READ which gets ``bad``."""

    def answer(hdr: Header, payload: bytes) -> bytes:
        if hdr.command == Command.REGION_READ:
            return bad(hdr, payload)
        return good_answer(hdr, payload)

    return answer


def scripted_server(
    sock: socket.socket, answer: Answer, hold: int, chunk: int, reverse: bool = False
) -> None:
    """Answer every request with ``answer``; after the handshake send replies ``hold`` at a time
    in one go (several replies per recv; last first if ``reverse``) and cut into
    ``chunk``-byte sends (split replies)."""
    held: list[bytes] = []
    try:
        while (msg := recv_message(sock)) is not None:
            hdr, payload = msg
            reply = answer(hdr, payload)
            if not reply:
                continue
            if hdr.command == Command.VERSION:
                sock.sendall(reply)
                continue
            held.append(reply)
            if len(held) == hold:
                pending = b"".join(reversed(held) if reverse else held)
                for start in range(0, len(pending), chunk):
                    sock.sendall(pending[start : start + chunk])
                held = []
    except (BrokenPipeError, ConnectionResetError):
        pass  # the load generator gave up on a bad reply
    finally:
        sock.close()


def run_against_script(
    answer: Answer,
    mode: LoadMode = LoadMode.READ,
    *,
    hold: int = 1,
    chunk: int = 1 << 30,
    reverse: bool = False,
    **kw: int,
) -> baselines.LoadgenResult:
    server_sock, client_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(
        target=scripted_server, args=(server_sock, answer, hold, chunk, reverse), daemon=True
    )
    thread.start()
    try:
        with client_sock:
            return baselines.run_loadgen(
                client_sock.fileno(), mode, warmup=0, timeout=STALL_TIMEOUT, **kw
            )
    finally:
        thread.join(10)  # our copy of the client end is closed: the server sees EOF
        assert not thread.is_alive()


@pytest.mark.parametrize(
    ("mode", "depth", "hold", "chunk"),
    [
        (LoadMode.READ, 1, 1, 5),  # every reply split into 5-byte sends
        (LoadMode.PIPELINE, 8, 8, 1 << 30),  # eight replies in one send
        (LoadMode.PIPELINE, 8, 8, 7),  # eight replies, cut across message boundaries
        (LoadMode.POSTED, 1, 1, 3),
    ],
)
def test_loadgen_reassembles_split_and_coalesced_replies(
    mode: LoadMode, depth: int, hold: int, chunk: int, no_fd_leak: None
) -> None:
    result = run_against_script(
        good_answer, mode, hold=hold, chunk=chunk, depth=depth, count=64, size=12
    )
    assert result.round_trips == 64


def wrong_size(hdr: Header, payload: bytes) -> bytes:
    body = payload[: RW_HEAD.size] + bytes(RW_HEAD.unpack_from(payload)[2] + 1)
    return reply_header(hdr.msg_id, hdr.command, len(body)).pack() + body


def error_flag(hdr: Header, payload: bytes) -> bytes:
    return Header(hdr.msg_id, hdr.command, HEADER_SIZE, FLAG_TYPE_REPLY | FLAG_ERROR, 5).pack()


def wrong_id(hdr: Header, payload: bytes) -> bytes:
    good = good_answer(hdr, payload)
    return struct.pack("=H", (hdr.msg_id + 1) & 0xFFFF) + good[2:]


def not_a_reply(hdr: Header, payload: bytes) -> bytes:
    good = good_answer(hdr, payload)
    return good[:8] + struct.pack("=I", 0) + good[12:]


def wrong_command(hdr: Header, payload: bytes) -> bytes:
    good = good_answer(hdr, payload)
    return good[:2] + struct.pack("=H", Command.REGION_WRITE) + good[4:]


def wrong_echo(hdr: Header, payload: bytes) -> bytes:
    offset, region, count = RW_HEAD.unpack_from(payload)
    body = RW_HEAD.pack(offset + 1, region, count) + bytes(count)
    return reply_header(hdr.msg_id, hdr.command, len(body)).pack() + body


def bad_major(hdr: Header, payload: bytes) -> bytes:
    if hdr.command != Command.VERSION:
        return good_answer(hdr, payload)
    body = VERSION_HEAD.pack(1, 0)
    return reply_header(hdr.msg_id, hdr.command, len(body)).pack() + body


def hang_up(hdr: Header, payload: bytes) -> bytes:
    raise BrokenPipeError  # the server closes the connection instead of answering


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (on_reads(wrong_size), r"payload is 21 bytes, expected 20"),
        (on_reads(error_flag), r"failed: errno 5"),
        (on_reads(wrong_id), r"reply to message \d+, which is not awaiting one"),
        (on_reads(not_a_reply), r"not typed as a reply"),
        (on_reads(wrong_command), r"carries command 10, expected 9"),
        (on_reads(wrong_echo), r"echoes offset 1"),
        (on_reads(hang_up), r"closed the connection"),
        (bad_major, r"major 1"),
    ],
)
def test_loadgen_rejects_bad_replies(answer: Answer, message: str, no_fd_leak: None) -> None:
    with pytest.raises(BenchToolError, match=message):
        run_against_script(answer, count=5, size=4)


def twice(hdr: Header, payload: bytes) -> bytes:
    good = good_answer(hdr, payload)
    return good + good


def test_loadgen_rejects_a_duplicate_reply(no_fd_leak: None) -> None:
    with pytest.raises(BenchToolError, match=r"reply to message 1, which is not awaiting one"):
        run_against_script(on_reads(twice), count=5, size=4)


@pytest.mark.parametrize(
    ("mode", "kw"),
    [
        (LoadMode.PIPELINE, {"depth": 8}),
        (LoadMode.QUEUES, {"depth": 8, "queues": 3, "stride": 8}),
        (LoadMode.BYPASS, {"batch": 7}),  # seven reads and the closing read of region 0
    ],
)
def test_loadgen_takes_replies_in_any_order(
    mode: LoadMode, kw: dict[str, int], no_fd_leak: None
) -> None:
    """Eight replies sent last first: each is matched to its request by ID."""
    result = run_against_script(good_answer, mode, hold=8, reverse=True, count=16, size=4, **kw)
    assert result.round_trips == 16


def recording(seen: list[tuple[int, int, int, bool]]) -> Answer:
    """Answer correctly, noting every region access (command, region, offset, posted)."""

    def answer(hdr: Header, payload: bytes) -> bytes:
        if hdr.command in (Command.REGION_READ, Command.REGION_WRITE):
            offset, region, _ = RW_HEAD.unpack_from(payload)
            seen.append((hdr.command, region, offset, hdr.no_reply))
        return good_answer(hdr, payload)

    return answer


def test_loadgen_queues_mode_spreads_doorbells(no_fd_leak: None) -> None:
    seen: list[tuple[int, int, int, bool]] = []
    result = run_against_script(
        recording(seen),
        LoadMode.QUEUES,
        depth=4,
        count=12,
        queues=3,
        stride=8,
        region=2,
        offset=0x100,
    )
    assert (result.mode, result.queues, result.depth, result.round_trips) == ("queues", 3, 4, 12)
    assert seen == [(Command.REGION_WRITE, 2, 0x100 + 8 * (i % 3), False) for i in range(12)]


def test_loadgen_bypass_mode_times_reads_apart(no_fd_leak: None) -> None:
    seen: list[tuple[int, int, int, bool]] = []
    result = run_against_script(
        recording(seen),
        LoadMode.BYPASS,
        batch=4,
        count=3,
        region=0,
        offset=8,
        read_region=1,
        read_offset=12,
    )
    pair = [(Command.REGION_WRITE, 0, 8, True), (Command.REGION_READ, 1, 12, False)]
    fence = [(Command.REGION_READ, 0, 8, False)]  # the round ends once its writes are done
    assert seen == (pair * 4 + fence) * 3
    assert (result.batch, result.round_trips, result.messages, result.reads) == (4, 3, 27, 12)
    assert 0 < result.read_median_us <= result.read_p99_us <= result.read_max_us


def test_loadgen_new_modes_against_echo(tmp_path: Path) -> None:
    with baselines.start_echo_server(tmp_path / "queues.sock") as server:
        queues = baselines.run_loadgen(
            server.path, LoadMode.QUEUES, depth=8, queues=4, count=100, timeout=STALL_TIMEOUT
        )
        assert server.wait() == 0
    with baselines.start_echo_server(tmp_path / "bypass.sock") as server:
        bypass = baselines.run_loadgen(
            server.path, LoadMode.BYPASS, batch=8, count=50, timeout=STALL_TIMEOUT
        )
        assert server.wait() == 0
    assert (queues.messages, queues.queues) == (100, 4)
    assert (bypass.messages, bypass.reads) == (850, 400)


def never_answer(hdr: Header, payload: bytes) -> bytes:
    return b""


def test_loadgen_stall_hits_the_timeout(no_fd_leak: None) -> None:
    server_sock, client_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(
        target=scripted_server, args=(server_sock, on_reads(never_answer), 1, 1 << 30)
    )
    thread.start()
    with client_sock, pytest.raises(BenchToolError, match="did not finish"):
        baselines.run_loadgen(client_sock.fileno(), count=1, warmup=0, timeout=0.5)
    thread.join(10)
    assert not thread.is_alive()
