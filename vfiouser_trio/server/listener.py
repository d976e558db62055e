"""Listening sockets for a vfio-user server, created the way clients expect.

Clients such as QEMU poll for the socket file and connect as soon as it appears,
so the file must only appear once it is listening: we bind a temporary name in the
same directory, set mode 0600, listen, then rename it over the final path.

- The temporary name is random (retried on a collision) and is bound through the
  directory's ``/proc/self/fd/N`` link, so its length does not depend on the final
  path's: any path that fits ``sun_path`` (107 bytes) works.
- An existing file at the path that is not a socket is an error, never overwritten.
  A socket file is replaced only when it is stale (connecting to it is refused); one
  where a server answers is refused. The check and the rename are not atomic: two
  servers started at the same instant on one path can still race.
- At exit the file is removed only if it is still the one we bound (same st_dev and
  st_ino), never a successor's.

Every start-up failure is a :class:`ListenerError` naming the path and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
from pathlib import Path

import trio

BACKLOG = 64

#: The longest path a client can connect to: sun_path is 108 bytes with the final NUL.
MAX_SOCKET_PATH = 107

#: Random temporary names tried before giving up (a collision is already unlikely).
_BIND_ATTEMPTS = 16

#: accept() errors that mean the process is short of fds or memory: pause, then retry.
_RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

log = logging.getLogger(__name__)


class ListenerError(Exception):
    """The listening socket could not be created at the requested place."""


class Listener:
    """A listening socket bound to a path; closing it removes the file if it is still ours."""

    def __init__(self, sock: socket.socket, path: Path, identity: tuple[int, int]) -> None:
        self.sock = sock
        self.path = path
        #: (st_dev, st_ino) of the socket file we bound.
        self.identity = identity

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        try:
            # Another server may have replaced the file since: only remove our own.
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self.identity:
                self.path.unlink()
        except FileNotFoundError:
            pass
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


def create_listener(path: str | os.PathLike[str], *, backlog: int = BACKLOG) -> Listener:
    """A listening AF_UNIX stream socket at ``path``, created atomically, mode 0600.

    A stale socket file at ``path`` is replaced; a live one (a server answers there),
    anything else there, a path too long for ``sun_path`` or any OS failure raises
    ListenerError.
    """
    target = Path(path)
    size = len(os.fsencode(target))
    if size > MAX_SOCKET_PATH:
        raise ListenerError(
            f"cannot listen on {target}: the path is {size} bytes, a UNIX socket path "
            f"holds at most {MAX_SOCKET_PATH}"
        )
    _check_replaceable(target)
    try:
        dir_fd = os.open(target.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ListenerError(f"cannot listen on {target}: {target.parent}: {_reason(exc)}") from exc
    try:
        return _bind_and_rename(target, dir_fd, backlog)
    finally:
        os.close(dir_fd)


def _check_replaceable(target: Path) -> None:
    """ListenerError unless ``target`` is absent or a stale socket file."""
    try:
        st = target.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenerError(f"cannot listen on {target}: {_reason(exc)}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{target} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.setblocking(False)
        probe.connect(os.fspath(target))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale (nobody listens) or gone: ours to take
    except BlockingIOError:
        pass  # a full backlog: someone listens there
    except OSError as exc:
        raise ListenerError(
            f"cannot listen on {target}: cannot tell whether a server uses it: {_reason(exc)}"
        ) from exc
    finally:
        probe.close()
    raise ListenerError(f"cannot listen on {target}: a server is listening there already")


def _bind_and_rename(target: Path, dir_fd: int, backlog: int) -> Listener:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmp: str | None = None
    try:
        tmp = _bind_temporary(sock, target, dir_fd)
        os.chmod(tmp, 0o600, dir_fd=dir_fd)
        st = os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False)
        sock.listen(backlog)
        os.rename(tmp, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        sock.close()
        if tmp is not None:
            with contextlib.suppress(OSError):  # renamed already
                os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            raise ListenerError(f"cannot listen on {target}: {_reason(exc)}") from exc
        raise
    sock.setblocking(False)
    return Listener(sock, target, (st.st_dev, st.st_ino))


def _bind_temporary(sock: socket.socket, target: Path, dir_fd: int) -> str:
    """Bind ``sock`` to a fresh random name in ``dir_fd``'s directory; return the name."""
    # The magic link names the directory in a few bytes whatever its real path.
    via_proc = os.path.isdir(f"/proc/self/fd/{dir_fd}")
    for _ in range(_BIND_ATTEMPTS):
        name = f".vfu-{secrets.token_hex(6)}"
        where = f"/proc/self/fd/{dir_fd}/{name}" if via_proc else os.fspath(target.parent / name)
        try:
            sock.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue  # something already has that name: draw another
            raise
        return name
    raise OSError(errno.EADDRINUSE, f"no free temporary name after {_BIND_ATTEMPTS} tries")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


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


async def accept(listener: socket.socket, *, backoff: float = 0.1) -> socket.socket:
    """Accept one connection (non-blocking, close-on-exec).

    Cancellation is checked before a connection is taken, never after: a cancelled
    accept leaves the connection in the backlog. When the process is out of fds or
    memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) it logs a warning, pauses ``backoff``
    seconds (``ServerLimits.accept_backoff`` when serving) and tries again.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
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
            if exc.errno in _RESOURCE_ERRNOS:
                log.warning(
                    "listening socket fd %d: accept() failed: %s; retrying in %g s",
                    listener.fileno(),
                    _reason(exc),
                    backoff,
                )
                await trio.sleep(backoff)
                continue
            raise
        conn.setblocking(False)
        # The connection is ours now: yield to the scheduler without letting a
        # cancellation drop it (as trio's own socket accept does).
        await trio.lowlevel.cancel_shielded_checkpoint()
        return conn
