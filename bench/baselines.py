"""Baselines measured in the same run as the targets: C tools compiled on demand and run here.

Machines are shared and noisy, so performance is reported as a ratio against these figures,
never as absolute numbers:

- :func:`run_pingpong` — raw AF_UNIX round trip with REGION_READ-sized messages (32 / 36 bytes);
- :func:`run_eventfd_pingpong` — eventfd signal-and-wait between two processes (interrupt floor);
- :func:`run_memcpy` — memcpy bandwidth per size (DMA throughput ceiling);
- :func:`start_echo_server` + :func:`run_loadgen` — a minimal blocking C vfio-user server driven
  by the C load generator (the "C echo server" figure). :func:`run_loadgen` drives any vfio-user
  server, so the same client measures the targets.

Every run is bounded (``seconds`` or ``count``, plus a timeout); no network is used.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .cbuild import tool_path

#: Default length of one measured figure, in seconds.
DEFAULT_SECONDS = 1.0
#: Copy sizes of :func:`run_memcpy`: 4 KiB .. 1 MiB in powers of 4.
DEFAULT_MEMCPY_SIZES: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576)
#: Extra time a tool gets beyond its measuring window (startup, warm-up, reporting).
TIMEOUT_MARGIN = 30.0
#: Timeout of a count-bounded run.
COUNT_TIMEOUT = 120.0


class BenchToolError(RuntimeError):
    """A C benchmark tool failed (exit status, protocol error, bad output)."""


class LoadMode(enum.StrEnum):
    """Workloads of the load generator."""

    #: REGION_READs one at a time.
    READ = "read"
    #: REGION_READs with ``depth`` requests in flight.
    PIPELINE = "pipeline"
    #: ``batch`` No_reply REGION_WRITEs, then one REGION_READ that is waited for.
    POSTED = "posted"
    #: ``batch`` pairs (No_reply REGION_WRITE to ``region``, REGION_READ of ``read_region``)
    #: and a REGION_READ of ``region`` (done after the writes) sent at once, then every reply;
    #: the ``read_region`` reads' latencies are reported on their own.
    BYPASS = "bypass"
    #: REGION_WRITEs with a reply, round-robin over ``queues`` doorbells ``stride`` bytes
    #: apart from ``offset``, ``depth`` in flight.
    QUEUES = "queues"


@dataclass(frozen=True, slots=True)
class LatencyResult:
    """Round-trip figures of one measured run. Latencies are per round trip, in µs."""

    tool: str
    mode: str
    #: Requests sent by the measuring side.
    messages: int
    #: Replies waited for (one per request, or one per batch in posted mode).
    round_trips: int
    seconds: float
    round_trips_per_s: float
    median_us: float
    p99_us: float


@dataclass(frozen=True, slots=True)
class LoadgenResult(LatencyResult):
    """A load generator run. In posted mode a round trip is a whole batch (writes + read)."""

    depth: int
    batch: int
    region: int
    offset: int
    size: int
    messages_per_s: float
    #: Region bytes moved per second (every request reads or writes ``size`` bytes), 10^6 B/s.
    mb_per_s: float
    #: Doorbell registers written (queues mode; 0 otherwise).
    queues: int = 0
    #: Reads timed on their own (bypass mode; 0 otherwise) and their latencies, in µs.
    reads: int = 0
    read_median_us: float = 0.0
    read_p99_us: float = 0.0
    read_max_us: float = 0.0


@dataclass(frozen=True, slots=True)
class MemcpyResult:
    """memcpy bandwidth for one copy size (the median of several timing slices)."""

    size: int
    mb_per_s: float
    bytes_copied: int
    seconds: float


def _bounds(
    seconds: float | None, count: int | None, timeout: float | None = None
) -> tuple[list[str], float]:
    """Command-line bound (``--count`` or ``--seconds``) and the timeout: ``timeout`` if
    given, else one that fits the bound."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if count is not None and seconds is not None:
        raise ValueError("give count or seconds, not both")
    if count is not None:
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        return ["--count", str(count)], timeout or COUNT_TIMEOUT
    if seconds is None:
        seconds = DEFAULT_SECONDS
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    return ["--seconds", repr(float(seconds))], timeout or seconds + TIMEOUT_MARGIN


def _run_tool(
    name: str, args: Sequence[str], timeout: float, pass_fds: Sequence[int] = ()
) -> dict[str, object]:
    """Run ``bench/c/<name>`` and return the JSON object it prints on its last line."""
    cmd = [str(tool_path(name)), *args]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            pass_fds=tuple(pass_fds),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchToolError(f"{name} did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchToolError(
            f"{name} exited with status {proc.returncode}: {proc.stderr.strip() or '(no message)'}"
        )
    return _parse_json_line(name, proc.stdout)


def _parse_json_line(name: str, stdout: str) -> dict[str, object]:
    lines = stdout.strip().splitlines()
    if not lines:
        raise BenchToolError(f"{name} printed no result")
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise BenchToolError(f"{name} printed invalid JSON: {lines[-1]!r}") from exc
    if not isinstance(value, dict):
        raise BenchToolError(f"{name} printed {type(value).__name__}, not an object")
    return value


def _int(obj: dict[str, object], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BenchToolError(f"result field {key!r} is not an integer: {value!r}")
    return value


def _float(obj: dict[str, object], key: str) -> float:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BenchToolError(f"result field {key!r} is not a number: {value!r}")
    return float(value)


def _str(obj: dict[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise BenchToolError(f"result field {key!r} is not a string: {value!r}")
    return value


def _latency(obj: dict[str, object]) -> LatencyResult:
    return LatencyResult(
        tool=_str(obj, "tool"),
        mode=_str(obj, "mode"),
        messages=_int(obj, "messages"),
        round_trips=_int(obj, "round_trips"),
        seconds=_float(obj, "seconds"),
        round_trips_per_s=_float(obj, "round_trips_per_s"),
        median_us=_float(obj, "median_us"),
        p99_us=_float(obj, "p99_us"),
    )


def run_pingpong(
    seconds: float | None = None, *, count: int | None = None, timeout: float | None = None
) -> LatencyResult:
    """AF_UNIX stream round trips between two processes, 32-byte pings and 36-byte pongs.

    Runs for ``seconds`` (default :data:`DEFAULT_SECONDS`) or exactly ``count`` round trips;
    BenchToolError if it takes longer than ``timeout`` (default: the bound plus a margin).
    """
    bound, timeout = _bounds(seconds, count, timeout)
    return _latency(_run_tool("pingpong", ["--mode", "unix", *bound], timeout))


def run_eventfd_pingpong(
    seconds: float | None = None, *, count: int | None = None, timeout: float | None = None
) -> LatencyResult:
    """eventfd signal-then-wait round trips between two processes (interrupt latency floor).

    Bounds as for :func:`run_pingpong`.
    """
    bound, timeout = _bounds(seconds, count, timeout)
    return _latency(_run_tool("pingpong", ["--mode", "eventfd", *bound], timeout))


def run_memcpy(
    sizes: Sequence[int] = DEFAULT_MEMCPY_SIZES, *, seconds_per_size: float = 0.2
) -> list[MemcpyResult]:
    """memcpy bandwidth in MB/s for each size, between two hot page-aligned buffers."""
    if not sizes:
        raise ValueError("no sizes given")
    if any(size < 1 for size in sizes):
        raise ValueError(f"sizes must be positive: {list(sizes)}")
    if not 0 < seconds_per_size <= 60:
        raise ValueError(f"seconds_per_size must be in (0, 60], got {seconds_per_size}")
    args = ["--sizes", ",".join(str(size) for size in sizes)]
    args += ["--seconds-per-size", repr(float(seconds_per_size))]
    timeout = seconds_per_size * len(sizes) + TIMEOUT_MARGIN
    obj = _run_tool("memcpy_bw", args, timeout)
    rows = obj.get("results")
    if not isinstance(rows, list):
        raise BenchToolError("memcpy_bw printed no results list")
    results = []
    for row in rows:
        if not isinstance(row, dict):
            raise BenchToolError(f"memcpy_bw result is not an object: {row!r}")
        results.append(
            MemcpyResult(
                size=_int(row, "size"),
                mb_per_s=_float(row, "mb_per_s"),
                bytes_copied=_int(row, "bytes"),
                seconds=_float(row, "seconds"),
            )
        )
    return results


class EchoServer:
    """A running ``vfu_echo`` process listening on ``path``. Use as a context manager or
    call :meth:`close`; both stop the process and remove the socket file."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.process = process

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the server to exit by itself (after its last client); its exit status.

        Raises BenchToolError, with the server's message, when the status is not 0.
        """
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchToolError(f"vfu_echo still running after {timeout} s") from exc
        if status != 0:
            raise BenchToolError(f"vfu_echo exited with status {status}: {self._stderr()}")
        return status

    def close(self) -> None:
        """Stop the server if it still runs, reap it, and remove its socket file."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(5.0)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()
            self.path.unlink(missing_ok=True)

    def _stderr(self) -> str:
        stream = self.process.stderr
        if stream is None or stream.closed:
            return "(no message)"
        return stream.read().decode(errors="replace").strip() or "(no message)"

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_echo_server(
    path: str | os.PathLike[str], *, clients: int = 1, ready_timeout: float = 10.0
) -> EchoServer:
    """Start ``vfu_echo`` listening on ``path``; returns once it accepts connections.

    It serves ``clients`` connections one after another and then exits (0 = until closed).
    """
    if clients < 0:
        raise ValueError(f"clients must be >= 0, got {clients}")
    sock_path = Path(path)
    cmd = [str(tool_path("vfu_echo")), "--socket", str(sock_path), "--clients", str(clients)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = EchoServer(sock_path, process)
    try:
        _wait_ready(server, ready_timeout)
    except BaseException:
        server.close()
        raise
    return server


def _wait_ready(server: EchoServer, timeout: float) -> None:
    """Block until the server prints its readiness line (it is listening by then)."""
    stdout = server.process.stdout
    assert stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchToolError(f"vfu_echo not listening after {timeout} s")
            if sel.select(remaining):
                break
    line = stdout.readline()
    if not line:
        server.process.wait(5.0)
        raise BenchToolError(
            f"vfu_echo exited with status {server.process.returncode}: {server._stderr()}"
        )
    if line.strip() != b'{"listening":true}':
        raise BenchToolError(f"vfu_echo printed {line!r} instead of its readiness line")


@contextlib.contextmanager
def echo_server(clients: int = 0) -> Iterator[EchoServer]:
    """A ``vfu_echo`` on a socket in a fresh temporary directory, removed afterwards."""
    with (
        tempfile.TemporaryDirectory(prefix="vfu-echo-") as tmp,
        start_echo_server(Path(tmp) / "echo.sock", clients=clients) as server,
    ):
        yield server


def run_loadgen(
    target: str | os.PathLike[str] | int,
    mode: LoadMode | str = LoadMode.READ,
    *,
    depth: int = 1,
    batch: int = 16,
    seconds: float | None = None,
    count: int | None = None,
    region: int = 0,
    offset: int = 0,
    size: int = 4,
    warmup: int = 100,
    timeout: float | None = None,
    read_region: int = 1,
    read_offset: int = 0,
    queues: int = 4,
    stride: int = 4,
) -> LoadgenResult:
    """Drive a vfio-user server with the C load generator and return its figures.

    ``target`` is the server's socket path, or (an ``int``) a connected socket fd that the
    load generator inherits; the fd stays open here. ``depth`` applies to
    :attr:`LoadMode.PIPELINE` and :attr:`LoadMode.QUEUES`, ``batch`` to
    :attr:`LoadMode.POSTED` and :attr:`LoadMode.BYPASS`, ``read_region``/``read_offset`` to
    BYPASS, ``queues``/``stride`` to QUEUES. Replies are matched by message ID (any order;
    one to an ID not awaiting a reply is a protocol error). The run lasts ``seconds``
    (default :data:`DEFAULT_SECONDS`) or ``count`` round trips, after ``warmup`` unmeasured
    ones. Raises BenchToolError on any protocol error (the message says which) or when the
    run outlasts ``timeout`` (default: the bound plus a margin; a stalled server hits it).
    """
    load_mode = LoadMode(mode)
    if load_mode not in (LoadMode.PIPELINE, LoadMode.QUEUES) and depth != 1:
        raise ValueError("depth applies to the pipeline and queues modes only")
    if not 1 <= depth <= 4096:
        raise ValueError(f"depth must be 1..4096, got {depth}")
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    if min(region, offset, size, warmup, read_region, read_offset, stride) < 0:
        raise ValueError("regions, offsets, size, stride and warmup must not be negative")
    if not 1 <= queues <= 4096:
        raise ValueError(f"queues must be 1..4096, got {queues}")
    bound, timeout = _bounds(seconds, count, timeout)
    args = ["--mode", load_mode.value, "--depth", str(depth), "--batch", str(batch)]
    args += ["--region", str(region), "--offset", str(offset), "--size", str(size)]
    args += ["--read-region", str(read_region), "--read-offset", str(read_offset)]
    args += ["--queues", str(queues), "--stride", str(stride)]
    args += ["--warmup", str(warmup), *bound]
    pass_fds: tuple[int, ...] = ()
    if isinstance(target, int):
        args += ["--fd", str(target)]
        pass_fds = (target,)
    else:
        args += ["--socket", os.fspath(target)]
    obj = _run_tool("vfu_loadgen", args, timeout, pass_fds)
    base = _latency(obj)
    return LoadgenResult(
        tool=base.tool,
        mode=base.mode,
        messages=base.messages,
        round_trips=base.round_trips,
        seconds=base.seconds,
        round_trips_per_s=base.round_trips_per_s,
        median_us=base.median_us,
        p99_us=base.p99_us,
        depth=_int(obj, "depth"),
        batch=_int(obj, "batch"),
        region=_int(obj, "region"),
        offset=_int(obj, "offset"),
        size=_int(obj, "size"),
        messages_per_s=_float(obj, "messages_per_s"),
        mb_per_s=_float(obj, "mb_per_s"),
        queues=_int(obj, "queues"),
        reads=_int(obj, "reads"),
        read_median_us=_float(obj, "read_median_us"),
        read_p99_us=_float(obj, "read_p99_us"),
        read_max_us=_float(obj, "read_max_us"),
    )
