"""The client of figure 3, run as its own process: maps guest memory, then serves it.

    python -m bench.figures.dma_client SOCKET --size BYTES --iova IOVA [--no-fd]

Connects, maps ``size`` bytes of fresh guest memory at ``iova`` (handing over the memfd, or
with ``--no-fd`` keeping it, so the device reaches it through DMA_READ / DMA_WRITE that this
process answers), announces the map to the DmaBenchDevice, then keeps serving until its
standard input reaches end-of-file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio

from bench.devices import DMA_READY_OFFSET
from vfiouser_trio.client import GuestMemory, connect


async def serve_guest_memory(path: str, size: int, iova: int, share_fd: bool) -> None:
    with GuestMemory(size) as memory:
        memory.view[:] = b"\x5a" * size  # touch every page before the device measures
        async with connect(path) as client:
            await client.dma_map(memory, iova, share_fd=share_fd)
            await client.write(0, DMA_READY_OFFSET, iova.to_bytes(8, "little"))
            async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
                while await stdin.receive_some():
                    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.figures.dma_client")
    parser.add_argument("socket")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--iova", type=lambda s: int(s, 0), required=True)
    parser.add_argument("--no-fd", action="store_true", help="map without handing over the fd")
    args = parser.parse_args(argv)
    trio.run(serve_guest_memory, args.socket, args.size, args.iova, not args.no_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
