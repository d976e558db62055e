"""Round trips per second through two engine Connections over a socketpair, in one trio run.

    python bench/engine_pingpong.py [--seconds N] [--tasks K] [--size BYTES]

With ``--tasks 1`` (the default) it measures latency-bound ping-pong: one request in flight.
With more tasks, requests are pipelined and replies batched.
"""

from __future__ import annotations

import argparse
import socket
import time

import trio

from vfiouser_trio.engine import HandlerResult, RawMessage, open_connection
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.protocol.framing import Frame


async def echo(frame: Frame) -> HandlerResult:
    return RawMessage(frame.payload)


async def run(seconds: float, tasks: int, size: int) -> int:
    a, b = socket.socketpair()
    payload = b"p" * size
    count = 0
    async with (
        open_connection(a, handler=echo) as _server,
        open_connection(b, handler=echo) as client,
    ):
        deadline = time.perf_counter() + seconds

        async def pinger() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await client.request_raw(Command.REGION_READ, payload)
                count += 1

        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(pinger)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tasks", type=int, default=1, help="concurrent requesting tasks")
    parser.add_argument("--size", type=int, default=16, help="payload bytes per message")
    args = parser.parse_args()
    count = trio.run(run, args.seconds, args.tasks, args.size)
    print(
        f"{count / args.seconds:,.0f} round trips/s "
        f"({args.tasks} task(s), {args.size}-byte payload, {args.seconds:g}s)"
    )


if __name__ == "__main__":
    main()
