"""Listening sockets for a vfio-user server, created the way clients expect.

Clients such as QEMU poll for the socket file and connect as soon as it appears,
so the file must only appear once it is listening: we bind a temporary name in the
same directory, listen, set mode 0600, then rename it over the final path. An
existing file at the path that is not a socket is an error, never overwritten.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import trio

BACKLOG = 64


class ListenerError(Exception):
    """The listening socket could not be created at the requested place."""


class Listener:
    """A listening socket bound to a path; closing it removes the file if it is still ours."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self._inode = path.lstat().st_ino

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        try:
            # Another server may have replaced the file since: only remove our own.
            if self.path.lstat().st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


def create_listener(path: str | os.PathLike[str], *, backlog: int = BACKLOG) -> Listener:
    """A listening AF_UNIX stream socket at ``path``, created atomically, mode 0600.

    A stale socket file at ``path`` is replaced; anything else there raises ListenerError.
    """
    target = Path(path)
    try:
        st = target.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{target} exists and is not a socket; refusing to replace it")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        tmp.unlink(missing_ok=True)
        sock.bind(os.fspath(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(backlog)
        os.rename(tmp, target)
    except OSError as exc:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise ListenerError(f"cannot listen on {target}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return Listener(sock, target)


def adopt_socket(fd: int) -> tuple[socket.socket, bool]:
    """Adopt an inherited AF_UNIX stream socket fd (``--fd=N``).

    Returns the socket and whether it is listening (True: accept clients on it;
    False: it is one already-connected client).
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenerError(f"fd {fd} is not a usable socket: {exc.strerror or exc}") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ListenerError(f"fd {fd} is not an AF_UNIX stream socket")
    os.set_inheritable(fd, False)
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    sock.setblocking(False)
    return sock, listening


async def accept(listener: socket.socket) -> socket.socket:
    """Accept one connection (non-blocking, close-on-exec)."""
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            # A client that gave up before we accepted it is not our error.
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                continue
            raise
        await trio.lowlevel.checkpoint()
        conn.setblocking(False)
        return conn
