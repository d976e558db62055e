"""Real libvfio-user peers for tests: its samples built from source, started as processes.

The source is found in ``VFIO_USER_LIBVFIO_USER_SRC`` or, failing that, in the QEMU source
tree that ``../shared/qemu/provision.sh`` unpacks (``src/subprojects/libvfio-user`` of its
cache: next to ``$VFIO_USER_QEMU``'s build directory, or ``$VFIO_USER_QEMU_CACHE``, default
``/var/cache/vfio-user-qemu``). The library and the samples are compiled with ``gcc``
directly (its meson.build also wants cmocka, for its own tests), against json-c
(``pkg-config json-c``), into ``$VFIO_USER_LIBVFIO_USER_BUILD`` (default
``~/.cache/vfio-user-trio/libvfio-user``) under a directory named by the hash of the
source and the command lines, so a second run reuses it. Without the source, gcc or
json-c, :func:`samples` skips the test with the reason.

A sample server has no readiness output: it binds its socket and listens in
``vfu_create_ctx`` and then blocks in ``accept``, and it serves one client only, so a
probing connection would end it. :func:`sample_server` therefore polls (trio-friendly)
for the socket file of the process it started, and :func:`connect_socket` retries the
one window between ``bind`` and ``listen`` (ECONNREFUSED).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

#: The library's sources (lib/meson.build without the pipe transport).
LIB_SOURCES = (
    "dma.c",
    "irq.c",
    "libvfio-user.c",
    "migration.c",
    "pci.c",
    "pci_caps.c",
    "tran.c",
    "tran_sock.c",
)
#: samples/client.c links only these of the library (samples/meson.build).
CLIENT_LIB_SOURCES = ("migration.c", "tran.c", "tran_sock.c")
SERVER_SAMPLES = ("server", "gpio-pci-idio-16")
CFLAGS = ("-O1", "-g", "-std=gnu99", "-D_GNU_SOURCE", "-pthread")
#: How long a sample may take to create its socket, or to exit once signalled.
START_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Samples:
    """The built sample programs (``client`` finds ``server`` next to itself, as it wants)."""

    directory: Path
    source: Path

    def __getitem__(self, name: str) -> Path:
        return self.directory / name


def find_source() -> Path | None:
    """The libvfio-user source tree, or None."""
    explicit = os.environ.get("VFIO_USER_LIBVFIO_USER_SRC")
    candidates = [Path(explicit)] if explicit else []
    qemu = os.environ.get("VFIO_USER_QEMU")
    if qemu:
        candidates.append(Path(qemu).resolve().parent.parent / "src/subprojects/libvfio-user")
    cache = os.environ.get("VFIO_USER_QEMU_CACHE", "/var/cache/vfio-user-qemu")
    candidates.append(Path(cache) / "src/subprojects/libvfio-user")
    for path in candidates:
        if (path / "lib/libvfio-user.c").is_file() and (path / "samples/server.c").is_file():
            return path
    return None


def _json_c_flags() -> tuple[list[str], list[str]] | None:
    if shutil.which("pkg-config") is None:
        return None
    try:
        cflags = subprocess.run(
            ["pkg-config", "--cflags", "json-c"], check=True, capture_output=True, text=True
        ).stdout.split()
        libs = subprocess.run(
            ["pkg-config", "--libs", "json-c"], check=True, capture_output=True, text=True
        ).stdout.split()
    except subprocess.CalledProcessError:
        return None
    return cflags, libs


def _commands(src: Path, out: Path, json_c: tuple[list[str], list[str]]) -> dict[str, list[str]]:
    cflags, libs = json_c
    base = ["gcc", *CFLAGS, *cflags, f"-I{src / 'include'}", f"-I{src / 'lib'}"]
    commands = {}
    for name in SERVER_SAMPLES:
        sources = [str(src / "lib" / s) for s in LIB_SOURCES] + [str(src / f"samples/{name}.c")]
        commands[name] = [*base, *sources, "-o", str(out / name), *libs]
    client = [str(src / "samples/client.c")] + [str(src / "lib" / s) for s in CLIENT_LIB_SOURCES]
    commands["client"] = [*base, *client, "-o", str(out / "client"), *libs]
    return commands


def _source_hash(src: Path, commands: dict[str, list[str]]) -> str:
    digest = hashlib.sha256()
    for path in sorted(src.glob("**/*.[ch]")):
        if path.is_relative_to(src / "test"):
            continue
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    # The output directory is the hash's own: leave it out of the commands hashed.
    for name in sorted(commands):
        digest.update(" ".join(a for a in commands[name] if not a.startswith("/")).encode())
    return digest.hexdigest()[:16]


def build(src: Path, cache: Path) -> Path:
    """Build the samples of ``src`` under ``cache`` once; the directory holding them."""
    json_c = _json_c_flags()
    if json_c is None:
        pytest.skip("libvfio-user needs json-c: no `pkg-config json-c` (libjson-c-dev)")
    if shutil.which("gcc") is None:
        pytest.skip("building libvfio-user's samples needs gcc")
    key = _source_hash(src, _commands(src, Path("/"), json_c))
    done = cache / key
    if (done / "client").is_file():
        return done
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        for name, command in _commands(src, work, json_c).items():
            result = subprocess.run(command, check=False, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"building libvfio-user's {name} failed:\n{result.stderr}")
        try:
            work.rename(done)  # atomic: a concurrent build of the same key may have won
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        if work.exists():
            shutil.rmtree(work)
    return done


def samples() -> Samples:
    """The built samples, or skip the test saying what is missing."""
    src = find_source()
    if src is None:
        pytest.skip(
            "no libvfio-user source: set VFIO_USER_LIBVFIO_USER_SRC, or provision QEMU "
            "(../shared/qemu/provision.sh keeps it in src/subprojects/libvfio-user)"
        )
    default = Path.home() / ".cache/vfio-user-trio/libvfio-user"
    cache = Path(os.environ.get("VFIO_USER_LIBVFIO_USER_BUILD", default))
    return Samples(build(src, cache), src)


@dataclass
class SampleProcess:
    """A running sample; its stdout and stderr go to ``log`` (read it with :meth:`output`)."""

    process: trio.Process
    log: Path
    socket: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def _wait_for_socket(proc: SampleProcess) -> None:
    with trio.fail_after(START_TIMEOUT):
        while True:
            try:
                if stat.S_ISSOCK(os.stat(proc.socket).st_mode):
                    return
            except FileNotFoundError:
                pass
            if proc.process.poll() is not None:
                raise AssertionError(f"{proc.process.args!r} exited early:\n{proc.output()}")
            # The sample prints nothing when it is ready (see the module docstring).
            await trio.sleep(0.01)


async def connect_socket(path: Path) -> socket.socket:
    """A socket connected to ``path``, retrying while it is bound but not yet listening."""
    with trio.fail_after(START_TIMEOUT):
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(os.fspath(path))
                return sock
            except ConnectionRefusedError:
                sock.close()
                await trio.sleep(0.01)
            except BaseException:
                sock.close()
                raise


@asynccontextmanager
async def sample_process(
    argv: Sequence[str | os.PathLike[str]], socket_path: Path, log: Path
) -> AsyncIterator[SampleProcess]:
    """Run ``argv`` (a sample server serving ``socket_path``); killed on exit if still up."""
    with open(log, "wb") as out:
        process = await trio.lowlevel.open_process(
            [os.fspath(a) for a in argv], stdout=out, stderr=subprocess.STDOUT
        )
    proc = SampleProcess(process, log, socket_path)
    try:
        await _wait_for_socket(proc)
        yield proc
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()


@asynccontextmanager
async def sample_server(
    built: Samples, tmp_path: Path, name: str = "server", tag: str = "server"
) -> AsyncIterator[SampleProcess]:
    """``samples/NAME -v SOCKET`` under ``tmp_path`` (its log: ``tmp_path/TAG.log``)."""
    path = tmp_path / f"{tag}.sock"
    async with sample_process([built[name], "-v", path], path, tmp_path / f"{tag}.log") as proc:
        yield proc
