"""A socket that counts what the transport does with it, for tests of its system calls."""

from __future__ import annotations

import socket
from typing import Any


class CountingSocket(socket.socket):
    """Counts ``sendmsg`` calls (the transport sends with nothing else) and reads that found
    the socket empty (``recvmsg_into`` raising BlockingIOError)."""

    sendmsg_calls = 0
    empty_reads = 0

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        self.sendmsg_calls += 1
        return super().sendmsg(*args, **kwargs)

    def recvmsg_into(self, *args: Any, **kwargs: Any) -> tuple[int, list[Any], int, Any]:
        try:
            return super().recvmsg_into(*args, **kwargs)
        except BlockingIOError:
            self.empty_reads += 1
            raise
