"""Figure 3: DMA throughput of a device, through an fd-backed map and through messages.

The device (a :class:`~bench.devices.DmaBenchDevice` served in this process) copies ``size``
bytes of guest memory into a device buffer and back: through a map whose memfd the client
handed over, with ``dma.try_read_into`` / ``dma.try_write`` per access (the synchronous copy
fast path, as a device serving independent requests calls it; the awaited ``read_into`` /
``write`` are shown beside it), and through DMA_READ / DMA_WRITE messages to a
client that kept its memfd (``dma.read_into`` / ``dma.write`` again, now over the socket).
Beside the fd-map figure: the same copies through a fresh zero-copy ``dma.view`` per access,
and through views held for the whole run (the copy alone, without any per-access cost).
Each client is a separate process (:mod:`bench.figures.dma_client`). Baselines, per size:
for the fd map, the same copy pattern between two buffers in this process (Python memoryview
slice assignment, i.e. memcpy behind one call; the C memcpy tool is shown too); for
messages, ``size``-byte sends through an AF_UNIX socketpair between two trio tasks of this
process (the issue's baseline), and beside it the fair floor of a request/reply between two
processes (:func:`~bench.figures.sockets.reply_floor_mb_per_s`: a 16-byte request and a
``size``-byte reply, Python and trio on both sides, nothing else). Bandwidth counts the bytes
copied (2 * size per round; the floor's ``size`` per round trip, as one DMA_READ moves).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext
from pathlib import Path

import trio

from bench.baselines import run_memcpy
from bench.devices import DmaBenchDevice
from vfiouser_trio.server import DmaTable, serve

from .common import (
    BenchError,
    Row,
    Settings,
    Target,
    bandwidth,
    median,
    ratio,
    size_label,
)
from .processes import REPO_ROOT, python_env, reap
from .sockets import reply_floor_mb_per_s, reply_peer, socketpair_mb_per_s, timed_mb_per_s

FIGURE = 3
TARGET = Target.ratio_at_least(0.8)
#: Sizes from which the fd-map target applies.
TARGET_FROM_SIZE = 65536
#: Message DMA against the socketpair, judged at :data:`MESSAGE_TARGET_SIZE`.
MESSAGE_TARGET = Target.ratio_at_least(0.5)
MESSAGE_TARGET_SIZE = 262144
#: Bytes the socketpair baseline sends per size (at least 16 sends).
SOCKETPAIR_BYTES = 8 << 20
IOVA = 0x1000_0000
PEER_TIMEOUT = 60.0
#: One copy round: guest memory (or the baseline's buffer) to a device buffer and back.
CopyRound = Callable[[], Awaitable[None]]


@asynccontextmanager
async def dma_client(
    socket_path: Path, size: int, *, share_fd: bool
) -> AsyncIterator[trio.Process]:
    """A client process serving ``size`` bytes mapped at :data:`IOVA`; must exit with 0."""
    argv = [sys.executable, "-m", "bench.figures.dma_client", str(socket_path)]
    argv += ["--size", str(size), "--iova", hex(IOVA)]
    if not share_fd:
        argv.append("--no-fd")
    process = await trio.lowlevel.open_process(
        argv,
        stdin=-1,
        env=python_env(),
        cwd=REPO_ROOT,  # -1: subprocess.PIPE
    )
    try:
        yield process
    finally:
        assert process.stdin is not None
        with trio.CancelScope(shield=True):
            await process.stdin.aclose()  # the client's end of work
        await reap(process, PEER_TIMEOUT)
    if process.returncode != 0:
        raise BenchError(f"DMA client (share_fd={share_fd}) exited with {process.returncode}")


async def _timed(copy_round: CopyRound, size: int, seconds: float) -> float:
    """MB/s of ``copy_round`` (which moves 2 * size bytes), run for ``seconds``."""
    return await timed_mb_per_s(copy_round, 2 * size, seconds)


class Copier:
    """The three copy patterns of one size, between guest memory and one device buffer."""

    def __init__(self, size: int, fd_dma: DmaTable, msg_dma: DmaTable) -> None:
        self.size = size
        self.fd_dma = fd_dma
        self.msg_dma = msg_dma
        self.buffer = memoryview(bytearray(size))
        self.plain = memoryview(bytearray(b"\xa5" * size))

    async def memcpy(self) -> None:
        # The baseline: the same two copies, between plain buffers of this process.
        self.buffer[:] = self.plain
        self.plain[:] = self.buffer

    async def fd_map(self) -> None:
        # What a device copying between checkpoints calls: the synchronous copies, with the
        # awaited calls behind them for what they decline (nothing, here).
        dma, buffer = self.fd_dma, self.buffer
        if not dma.try_read_into(IOVA, buffer):
            await dma.read_into(IOVA, buffer)
        if not dma.try_write(IOVA, buffer):
            await dma.write(IOVA, buffer)

    async def fd_awaited(self) -> None:
        await self.fd_dma.read_into(IOVA, self.buffer)
        await self.fd_dma.write(IOVA, self.buffer)

    async def fd_view(self) -> None:
        with self.fd_dma.view(IOVA, self.size) as guest:
            self.buffer[:] = guest
        with self.fd_dma.view(IOVA, self.size, writable=True) as guest:
            guest[:] = self.buffer

    @contextmanager
    def held_view(self) -> Iterator[CopyRound]:
        """A copy round through views taken once: the copy alone, without the per-access cost
        of looking up the map and taking the view."""
        with (
            self.fd_dma.view(IOVA, self.size) as source,
            self.fd_dma.view(IOVA, self.size, writable=True) as dest,
        ):

            async def copy_round() -> None:
                self.buffer[:] = source
                dest[:] = self.buffer

            yield copy_round

    async def messages(self) -> None:
        await self.msg_dma.read_into(IOVA, self.buffer)
        await self.msg_dma.write(IOVA, self.buffer)


async def _measure(settings: Settings) -> list[Row]:
    sizes = settings.dma_sizes
    largest = max(sizes)
    fd_device, msg_device = DmaBenchDevice(), DmaBenchDevice()
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vfu-bench-dma-") as tmp:
        fd_path, msg_path = Path(tmp) / "fd.sock", Path(tmp) / "msg.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, fd_device, fd_path)
            await nursery.start(serve, msg_device, msg_path)
            async with (
                dma_client(fd_path, largest, share_fd=True),
                dma_client(msg_path, largest, share_fd=False),
                reply_peer() as peer,
            ):
                with trio.fail_after(PEER_TIMEOUT):
                    for device in (fd_device, msg_device):
                        if await device.wait_ready() != IOVA:
                            raise BenchError("the DMA client mapped an unexpected IOVA")
                for rep in range(settings.repeats):
                    c_rows = await trio.to_thread.run_sync(
                        lambda: run_memcpy(sizes, seconds_per_size=settings.copy_seconds)
                    )
                    for c_row in c_rows:
                        results.setdefault(("c", c_row.size), []).append(c_row.mb_per_s)
                    for size in sizes:
                        copier = Copier(size, fd_device.dma, msg_device.dma)
                        methods: list[tuple[str, AbstractContextManager[CopyRound]]] = [
                            ("py", nullcontext(copier.memcpy)),
                            ("fd", nullcontext(copier.fd_map)),
                            ("awaited", nullcontext(copier.fd_awaited)),
                            ("view", nullcontext(copier.fd_view)),
                            ("held", copier.held_view()),
                            ("msg", nullcontext(copier.messages)),
                        ]
                        if rep % 2:
                            methods.reverse()
                        for name, context in methods:
                            with context as method:
                                value = await _timed(method, size, settings.copy_seconds)
                            results.setdefault((name, size), []).append(value)
                        sent = max(SOCKETPAIR_BYTES, 16 * size)
                        value = await socketpair_mb_per_s(sent, size)
                        results.setdefault(("socketpair", size), []).append(value)
                        value = await reply_floor_mb_per_s(peer, size, settings.copy_seconds)
                        results.setdefault(("floor", size), []).append(value)
            nursery.cancel_scope.cancel()
    for device in (fd_device, msg_device):
        device.close()
    return _rows(sizes, {key: median(values) for key, values in results.items()})


def _rows(sizes: tuple[int, ...], mb: dict[tuple[str, int], float]) -> list[Row]:
    rows = []
    for size in sizes:
        py, c, fd, held = mb["py", size], mb["c", size], mb["fd", size], mb["held", size]
        view, awaited = mb["view", size], mb["awaited", size]
        rows.append(
            Row(
                FIGURE,
                f"DMA fd map, try_read_into/try_write per access, {size_label(size)}",
                f"{bandwidth(fd)} (awaited read_into/write: {bandwidth(awaited)}; "
                f"a view per access: {bandwidth(view)}; view held: {bandwidth(held)})",
                f"memcpy here {bandwidth(py)}; C memcpy {bandwidth(c)}",
                ratio(fd, py),
                TARGET if size >= TARGET_FROM_SIZE else None,
            )
        )
    for size in sizes:
        pair, msg = mb["socketpair", size], mb["msg", size]
        rows.append(
            Row(
                FIGURE,
                f"DMA messages (DMA_READ/WRITE), {size_label(size)}",
                bandwidth(msg),
                f"AF_UNIX socketpair in Python {bandwidth(pair)}",
                ratio(msg, pair),
                MESSAGE_TARGET if size == MESSAGE_TARGET_SIZE else None,
            )
        )
    for size in sizes:
        floor, msg = mb["floor", size], mb["msg", size]
        rows.append(
            Row(
                FIGURE,
                f"DMA messages against the two-process floor, {size_label(size)}",
                bandwidth(msg),
                f"request + {size_label(size)} reply, two Python processes {bandwidth(floor)}",
                ratio(msg, floor),
                None,
            )
        )
    return rows


def measure(settings: Settings) -> list[Row]:
    """Figure 3's rows: per size, the fd-map path, then per size the message path."""
    return trio.run(_measure, settings)
