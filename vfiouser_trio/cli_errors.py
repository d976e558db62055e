"""How the command line fails: one line on stderr and a non-zero exit status, never a traceback.

Every sub-command runs through :func:`run_command`. Whatever escapes it (an OSError, a peer's
error reply, an ExceptionGroup from trio's nurseries, a bug of ours) becomes one line,
``vfio-user-trio serve: <what went wrong>``, and exit status 1 (130 on Ctrl-C). The traceback
is still logged at DEBUG, so ``-v`` shows it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator

import trio

from .protocol.errors import VfioUserError

log = logging.getLogger("vfiouser_trio")

#: Exit status of a command interrupted by SIGINT (128 + 2, as shells report it).
INTERRUPTED = 130


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``'s (nested) groups, in order; ``exc`` if it is none."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def describe(exc: BaseException) -> str:
    """What went wrong, for a user: ``No such file or directory: 'x.sock'``, ``[EINVAL] ...``."""
    if isinstance(exc, SystemExit):
        return str(exc.code)
    if isinstance(exc, OSError) and not isinstance(exc, VfioUserError) and exc.strerror:
        name = f": {exc.filename!r}" if exc.filename is not None else ""
        return f"{exc.strerror}{name}"
    if isinstance(exc, VfioUserError | ValueError | trio.TooSlowError):
        return str(exc) or type(exc).__name__
    # A bug (ours, or a device's): name its type, and where to see more.
    return f"{type(exc).__name__}: {exc} (-v shows the traceback)"


def run_command(func: Callable[[], int], prog: str) -> int:
    """``func()``'s exit status; a failure is one line on stderr and status 1."""
    try:
        return func()
    except SystemExit:
        raise  # already one line (our own messages) or a status (argparse's, sys.exit)
    except BaseException as exc:  # every failure, bugs included, is reported the same way
        found = [e for e in leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
        if any(isinstance(e, KeyboardInterrupt) for e in found):
            print(f"{prog}: interrupted", file=sys.stderr)
            return INTERRUPTED
        log.debug("%s failed", prog, exc_info=exc)
        first = found[0]
        if isinstance(first, SystemExit):  # raised inside a nursery: as if raised alone
            if isinstance(first.code, int):
                return first.code
            print(first.code, file=sys.stderr)
            return 1
        more = f" (and {len(found) - 1} more errors)" if len(found) > 1 else ""
        print(f"{prog}: {describe(first)}{more}", file=sys.stderr)
        return 1
