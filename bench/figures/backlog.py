"""Figure 7: server memory when a client pipelines requests and never reads the replies.

One server process (``python -m bench.devices serve gpio --count 1``) serves the gpio
example. A raw client negotiates, reads once (so one-time costs are paid), and the server's
VmRSS is read. The client then writes 400,000 4-byte REGION_READs of BAR2 (32 bytes each)
on its one connection and never reads its socket. It writes without blocking until every
request is written or the server has taken nothing for :data:`STALL_SECONDS` (a server that
stops reading a client whose replies pile up is doing its job). Once the server's CPU time
stops moving (it has done all it will), VmRSS is read again: the growth is the figure.
The client then hangs up and the server must still be alive and stop cleanly.

The count scales with ``--seconds`` below 1 s (a quick run writes 80,000 requests).
"""

from __future__ import annotations

import select
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .common import BenchError, Row, Settings, Target, median
from .processes import cpu_ticks, device_socket, many_devices_server, rss_kib
from .wire import connect, read_once, region_reads

FIGURE = 7
REQUESTS = 400_000
GPIO_BAR = 2
#: The server has stopped reading once it took nothing for this long.
STALL_SECONDS = 1.0
#: Polls of the server's CPU time while waiting for it to go idle, and the longest wait.
IDLE_POLL = 0.2
IDLE_TIMEOUT = 30.0
TARGET_MIB = 64
TARGET = Target(TARGET_MIB, False, f"≤ {TARGET_MIB} MiB")
#: How long a new client may be refused (busy) after the unread client hung up, and what
#: counts as "at once".
RELEASE_TIMEOUT = 5.0
RELEASE_SLOW = 0.5
#: Requests written per send() call.
CHUNK = 2048


@dataclass(frozen=True, slots=True)
class Backlog:
    #: Server RSS growth, in MiB.
    growth_mib: float
    #: Server RSS before the requests, in MiB.
    before_mib: float
    #: Requests the server took off the socket (all of them unless it stopped reading).
    written: int


def wait_idle(pid: int) -> None:
    """Return once the process has used no CPU for one :data:`IDLE_POLL`."""
    deadline = time.monotonic() + IDLE_TIMEOUT
    last = cpu_ticks(pid)
    while time.monotonic() < deadline:
        time.sleep(IDLE_POLL)
        now = cpu_ticks(pid)
        if now == last:
            return
        last = now


def write_unread(path: Path, requests: int, pid: int) -> Backlog:
    """The measurement of the module docstring, on the device served at ``path``."""
    sock = connect(path)
    try:
        read_once(sock, GPIO_BAR, 0, 4)
        wait_idle(pid)
        before = rss_kib(pid)
        sock.setblocking(False)
        frame = len(region_reads(1, GPIO_BAR, 0, 4))
        chunk = region_reads(CHUNK, GPIO_BAR, 0, 4)
        data = memoryview(chunk * (requests // CHUNK) + region_reads(requests % CHUNK, 2, 0, 4))
        sent = 0
        while sent < len(data):
            try:
                sent += sock.send(data[sent : sent + len(chunk)])
            except BlockingIOError:
                _, writable, _ = select.select([], [sock], [], STALL_SECONDS)
                if not writable:
                    break
        wait_idle(pid)
        after = rss_kib(pid)
    finally:
        sock.close()
    return Backlog((after - before) / 1024, before / 1024, sent // frame)


def released_after(path: Path, timeout: float = RELEASE_TIMEOUT) -> float | None:
    """Seconds until a new client of ``path`` is answered (not refused as busy), or None."""
    started = time.monotonic()
    while True:
        try:
            with connect(path, timeout=1.0) as sock:
                read_once(sock, GPIO_BAR, 0, 4)
            return time.monotonic() - started
        except (BenchError, OSError):  # refused as busy, or not answered
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.05)


def measure(settings: Settings) -> list[Row]:
    """Figure 7's row: RSS growth with the replies of REQUESTS requests unread."""
    requests = int(REQUESTS * min(1.0, settings.seconds))
    repeats = min(settings.repeats, 3)
    runs: list[Backlog] = []
    released: list[float | None] = []
    with tempfile.TemporaryDirectory(prefix="vfu-bench-backlog-") as tmp:
        directory = Path(tmp)
        # A device per run, so that each run starts on a device no client has held.
        with many_devices_server("gpio", repeats, directory) as server:
            for rep in range(repeats):
                path = device_socket(directory, rep)
                runs.append(write_unread(path, requests, server.pid))
                released.append(released_after(path))
                server.check_alive()
    growth = median([r.growth_mib for r in runs])
    taken = min(r.written for r in runs)
    taken_text = "all taken" if taken == requests else f"server stopped reading after {taken:,}"
    if all(t is not None for t in released):
        release_text = "device free again at once after the hang-up"
        if max(t for t in released if t is not None) > RELEASE_SLOW:
            release_text = f"device free again within {RELEASE_TIMEOUT:g} s of the hang-up"
    else:
        release_text = f"**device still busy {RELEASE_TIMEOUT:g} s after the hang-up**"
    return [
        Row(
            FIGURE,
            f"server RSS growth, {requests:,} pipelined REGION_READs whose replies are never read",
            f"+{growth:.1f} MiB ({taken_text}; {release_text})",
            f"server RSS {median([r.before_mib for r in runs]):.1f} MiB before",
            None,
            TARGET,
            judged=growth,
        )
    ]
