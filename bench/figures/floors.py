"""Reference floors for figure 1: the least a Python server can do per REGION_READ.

    python -m bench.figures.floors {blocking,trio} --socket PATH

A bare responder, no framework: it parses the 16-byte header, answers VERSION with version
0.0 and no capabilities, answers REGION_READ with zeros (echoing the request's access head),
answers REGION_WRITE with its 16-byte head unless No_reply is set, and nothing else. One
client at a time; prints ``ready`` once listening and exits with status 0 on SIGTERM.

``blocking`` is plain ``recv``/``sendall``; ``trio`` is the same loop awaiting a trio socket.
Driven by the same C load generator as our server, they show how much of the distance to the
raw C ping-pong is Python itself, and how much is the trio event loop, before any of our code.
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from types import FrameType

import trio

HEADER = struct.Struct("=HHIII")  # msg_id, command, msg_size, flags, error
ACCESS = struct.Struct("=QII")  # offset, region, count
VERSION, REGION_READ, REGION_WRITE = 1, 9, 10
FLAG_REPLY, FLAG_NO_REPLY, FLAG_ERROR = 0x1, 0x10, 0x20
EINVAL = 22


def answer(buffer: bytearray) -> tuple[bytes, int]:
    """Replies to every whole message at the front of ``buffer``, and the bytes consumed."""
    out = []
    pos = 0
    while len(buffer) - pos >= HEADER.size:
        msg_id, command, size, flags, _ = HEADER.unpack_from(buffer, pos)
        if size < HEADER.size or len(buffer) - pos < size:
            break
        body = b""
        error = 0
        if command == VERSION:
            body = b"\0\0\0\0"
        elif command == REGION_READ and size >= HEADER.size + ACCESS.size:
            head = bytes(buffer[pos + HEADER.size : pos + HEADER.size + ACCESS.size])
            body = head + bytes(ACCESS.unpack(head)[2])
        elif command == REGION_WRITE and size >= HEADER.size + ACCESS.size:
            body = bytes(buffer[pos + HEADER.size : pos + HEADER.size + ACCESS.size])
        else:
            error = EINVAL
        if not flags & FLAG_NO_REPLY:
            reply_flags = FLAG_REPLY | (FLAG_ERROR if error else 0)
            out.append(HEADER.pack(msg_id, command, HEADER.size + len(body), reply_flags, error))
            out.append(body)
        pos += size
    return b"".join(out), pos


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve_blocking(path: str) -> None:
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        print("ready", flush=True)
        while True:
            conn, _ = listener.accept()
            with conn:
                buffer = bytearray()
                while data := conn.recv(65536):
                    buffer += data
                    replies, used = answer(buffer)
                    del buffer[:used]
                    if replies:
                        conn.sendall(replies)


async def serve_trio(path: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop)
            listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with listener:
                await listener.bind(path)
                listener.listen()
                print("ready", flush=True)
                while True:
                    conn, _ = await listener.accept()
                    with conn:
                        buffer = bytearray()
                        while data := await conn.recv(65536):
                            buffer += data
                            replies, used = answer(buffer)
                            del buffer[:used]
                            while replies:
                                replies = replies[await conn.send(replies) :]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.figures.floors")
    parser.add_argument("kind", choices=("blocking", "trio"))
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    if args.kind == "blocking":
        serve_blocking(args.socket)
    else:
        trio.run(serve_trio, args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
