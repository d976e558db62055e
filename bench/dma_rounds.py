"""Message DMA rounds on command, for :mod:`bench.instructions` to count.

    python -m bench.dma_rounds --size BYTES --rounds N

Serves a :class:`~bench.devices.DmaBenchDevice` in this process to the client process of
figure 3 (:mod:`bench.figures.dma_client` with ``--no-fd``, so every access is a DMA_READ or
DMA_WRITE message it answers), warms up, then talks over its standard streams: it prints
``ready SERVER_PID CLIENT_PID``, waits for a line on standard input, runs ``N`` rounds
(``dma.read_into`` then ``dma.write`` of ``BYTES``, as figure 3's message row), prints
``done``, and exits at the next line or end of file. Between ``ready`` and ``done`` both
processes do the rounds and nothing else, so a counter switched on and off around them
counts the rounds alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from bench.devices import DmaBenchDevice
from bench.figures.dma import IOVA, PEER_TIMEOUT, dma_client
from vfiouser_trio.server import serve

#: Rounds run before ``ready``: the first accesses build what later ones reuse.
WARMUP_ROUNDS = 5


async def _line(stdin: trio.lowlevel.FdStream) -> None:
    """Wait for a line (or end of file) on standard input."""
    while (data := await stdin.receive_some()) and b"\n" not in data:
        pass


async def run_rounds(size: int, rounds: int) -> None:
    device = DmaBenchDevice()
    buffer = memoryview(bytearray(size))
    with tempfile.TemporaryDirectory(prefix="vfu-bench-dma-rounds-") as tmp:
        path = Path(tmp) / "dma.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, device, path)
            async with (
                dma_client(path, size, share_fd=False) as client,
                trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin,
            ):
                with trio.fail_after(PEER_TIMEOUT):
                    if await device.wait_ready() != IOVA:
                        raise RuntimeError("the DMA client mapped an unexpected IOVA")
                for _ in range(WARMUP_ROUNDS):
                    await device.dma.read_into(IOVA, buffer)
                    await device.dma.write(IOVA, buffer)
                print(f"ready {os.getpid()} {client.pid}", flush=True)
                await _line(stdin)
                for _ in range(rounds):
                    await device.dma.read_into(IOVA, buffer)
                    await device.dma.write(IOVA, buffer)
                print("done", flush=True)
                await _line(stdin)
            nursery.cancel_scope.cancel()
    device.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dma_rounds", description=__doc__)
    parser.add_argument("--size", type=int, default=4096, help="bytes per access")
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args(argv)
    if args.size < 1 or args.rounds < 1:
        parser.error("--size and --rounds must be at least 1")
    trio.run(run_rounds, args.size, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
