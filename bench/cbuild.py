"""Compile the benchmark's C tools with the system gcc, cached by a hash of source and flags.

A binary is named ``<stem>-<hash>``, where the hash covers the source text and the compiler
flags, so an edited source gets a fresh binary and an unchanged one is reused. Builds go to a
temporary name and are renamed into place, so concurrent runs never see a half-written binary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: The C sources of the benchmark tools.
C_SOURCE_DIR = Path(__file__).resolve().parent / "c"
#: Default cache of compiled tools (gitignored).
DEFAULT_BUILD_DIR = Path(__file__).resolve().parent / ".build"
CFLAGS: tuple[str, ...] = ("-O2", "-std=gnu11", "-Wall", "-Wextra")
#: Bounds a wedged compiler; a tool compiles in well under a second.
COMPILE_TIMEOUT = 120.0


class CompilerNotFoundError(RuntimeError):
    """No gcc on PATH: the C baselines cannot be built."""


class CompileError(RuntimeError):
    """gcc rejected a source file; the message carries its diagnostics."""


def find_compiler() -> str | None:
    """Path of the system gcc, or None when there is none."""
    return shutil.which("gcc")


def _usable_build_dir(build_dir: Path | None) -> Path:
    """The requested cache dir, or the default one, or a per-user temp dir if that is read-only."""
    if build_dir is not None:
        build_dir.mkdir(parents=True, exist_ok=True)
        return build_dir
    try:
        DEFAULT_BUILD_DIR.mkdir(parents=True, exist_ok=True)
        if os.access(DEFAULT_BUILD_DIR, os.W_OK | os.X_OK):
            return DEFAULT_BUILD_DIR
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"vfiouser_trio-bench-{os.getuid()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    return fallback


def binary_name(source: Path, cflags: Sequence[str] = CFLAGS) -> str:
    """The cache name of ``source`` compiled with ``cflags``: ``<stem>-<16 hex digits>``."""
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    # The tools share headers next to them: a change there must rebuild every tool.
    for header in sorted(source.parent.glob("*.h")):
        digest.update(b"\0" + header.read_bytes())
    digest.update(b"\0" + "\0".join(cflags).encode())
    return f"{source.stem}-{digest.hexdigest()[:16]}"


def compile_c(source: Path, build_dir: Path | None = None, cflags: Sequence[str] = CFLAGS) -> Path:
    """Compile ``source`` into an executable (reusing a cached one) and return its path.

    Raises CompilerNotFoundError without gcc, CompileError when gcc fails.
    """
    gcc = find_compiler()
    if gcc is None:
        raise CompilerNotFoundError("gcc not found on PATH; the C baselines need it")
    out_dir = _usable_build_dir(build_dir)
    target = out_dir / binary_name(source, cflags)
    if os.access(target, os.X_OK):
        return target

    tmp = out_dir / f".{target.name}.{os.getpid()}.tmp"
    try:
        proc = subprocess.run(
            [gcc, *cflags, "-o", str(tmp), str(source)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise CompileError(f"gcc failed on {source.name}:\n{proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _remove_stale(target)
    return target


def _remove_stale(current: Path) -> None:
    """Delete older builds of the same tool (other hashes); they can never be used again."""
    stem = current.name.rsplit("-", 1)[0]
    for old in current.parent.glob(f"{stem}-*"):
        if old != current and old.name.rsplit("-", 1)[0] == stem:
            old.unlink(missing_ok=True)


def tool_path(name: str, build_dir: Path | None = None) -> Path:
    """The compiled executable of the tool ``bench/c/<name>.c``, building it if needed."""
    source = C_SOURCE_DIR / f"{name}.c"
    if not source.is_file():
        raise FileNotFoundError(f"no C source for benchmark tool {name!r} at {source}")
    return compile_c(source, build_dir)
