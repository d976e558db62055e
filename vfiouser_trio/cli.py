"""The ``vfio-user-trio`` command: demo, serve, describe, lspci, migrate, conform, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TextIO

import trio

from . import __version__
from .backend_description import describe
from .cli_errors import run_command
from .client import (
    DEFAULT_NEGOTIATION_TIMEOUT,
    MigrationError,
    MigrationProgress,
    MigrationSummary,
    Phase,
    connect,
    migrate,
)
from .client.client import DEFAULT_CAPABILITIES
from .demo import run as run_demo
from .examples import EXAMPLES
from .examples.nvme import nvme_controller
from .inspector import lspci
from .ordering import ConcurrentOrder, KeyedOrder, OrderingPolicy, SpecOrder, region_key
from .protocol.capabilities import Capabilities
from .protocol.errors import ProtocolError, VfioUserError
from .server.device import Device
from .server.listener import ListenerError
from .server.serve import serve

log = logging.getLogger("vfiouser_trio")


def load_device_factory(spec: str) -> Callable[[], Device]:
    """A device factory from an example name (``gpio``) or ``module:attribute``.

    The attribute is a Device subclass or any zero-argument callable returning a Device.
    """
    if spec in EXAMPLES:
        return EXAMPLES[spec]
    target = _load_attribute("device", spec, EXAMPLES)
    if not callable(target):
        raise SystemExit(f"{spec!r} is not a Device class or factory")
    return target


#: ``serve --policy`` names for the shipped ordering policies.
POLICIES: dict[str, Callable[[], OrderingPolicy]] = {
    "spec": SpecOrder,
    "concurrent": ConcurrentOrder,
    "region": partial(KeyedOrder, region_key),
}


def load_policy(spec: str) -> OrderingPolicy:
    """An ordering policy from a name (``spec``, ``concurrent``, ``region``: KeyedOrder by
    region) or ``module:attribute``: an OrderingPolicy subclass, a zero-argument callable
    returning a policy, or a policy object."""
    if spec in POLICIES:
        return POLICIES[spec]()
    target = _load_attribute("policy", spec, POLICIES)
    if not isinstance(target, OrderingPolicy):
        try:
            target = target() if callable(target) else target
        except Exception as exc:
            raise SystemExit(f"cannot create policy {spec!r}: {exc}") from exc
    if not isinstance(target, OrderingPolicy):
        raise SystemExit(f"{spec!r} is not an OrderingPolicy class, factory or object")
    return target


def _load_attribute(what: str, spec: str, names: Mapping[str, object]) -> object:
    """``module:attribute`` imported, or a one-line SystemExit naming ``what`` and ``names``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        known = ", ".join(sorted(names))
        raise SystemExit(f"unknown {what} {spec!r}: use one of {known} or module:attribute")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"cannot load {what} {spec!r}: {exc}") from exc


async def _until_signalled(run: Callable[[], object]) -> None:
    """Run ``run`` until it returns or SIGTERM/SIGINT arrives (then cancel it cleanly)."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def watch() -> None:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await run()  # type: ignore[misc]
            nursery.cancel_scope.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a device per the spec's backend conventions (never daemonizes, logs to stderr,
    ends cleanly on SIGTERM); ``--once`` returns after the first client leaves."""
    if (args.socket_path is None) == (args.fd is None):
        raise SystemExit("give exactly one of --socket-path=PATH and --fd=N")
    factory = load_device_factory(args.device)
    policy = load_policy(args.policy) if args.policy is not None else None
    device = _nvme(args) if args.device == "nvme" else factory()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve, device, args.socket_path, fd=args.fd, once=args.once, policy=policy)
            )
            # Logged once the socket is listening: scripts and tests wait for this line.
            log.info("serving %s on %s", device.name, args.socket_path or f"fd {args.fd}")

    try:
        trio.run(_until_signalled, run)
    except (ListenerError, BaseExceptionGroup) as exc:
        cause = _listener_error(exc)
        if cause is None:
            raise
        # One line, no traceback: the socket path is the user's input, not our bug.
        raise SystemExit(f"vfio-user-trio serve: {cause}") from None
    finally:
        device.close()
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """Print the JSON description of ``serve DEVICE`` the spec's backend conventions ask
    for (fields and choices: ``vfiouser_trio/backend_description.py``)."""
    device = load_device_factory(args.device)()
    try:
        print(json.dumps(describe(args.device, device), indent=2))
    finally:
        device.close()
    return 0


def _nvme(args: argparse.Namespace) -> Device:
    """``serve nvme``: the namespace from --backing FILE and --size N."""
    try:
        return nvme_controller(args.backing, args.size)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"vfio-user-trio serve nvme: {exc}") from None


def _listener_error(exc: BaseException) -> ListenerError | None:
    """The ListenerError that is all ``exc`` is (possibly inside nested groups), else None."""
    cause = _sole_error(exc, (ListenerError,))
    return cause if isinstance(cause, ListenerError) else None


def _sole_error(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The one exception of ``kinds`` that is all ``exc`` is (inside nested groups), else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, kinds) else None


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the gpio example and drive it with the client, printing the tour."""
    return run_demo()


def cmd_lspci(args: argparse.Namespace) -> int:
    """Print a server's config space as ``lspci -x`` does, then a region/IRQ summary.

    A server that cannot be reached or does not answer is one line on stderr, exit 1.
    """
    timeout = args.timeout if args.timeout > 0 else None
    try:
        trio.run(partial(lspci, args.socket, level=min(args.dump, 4), negotiation_timeout=timeout))
    except BaseException as exc:  # re-raised below unless it is the peer's doing
        cause = _sole_error(exc, (OSError, VfioUserError))
        if cause is None:
            raise
        print(f"vfio-user-trio lspci: {args.socket}: {_describe(cause)}", file=sys.stderr)
        return 1
    return 0


def _describe(exc: BaseException) -> str:
    """``No such file or directory`` rather than ``[Errno 2] No such file or directory: ''``."""
    if isinstance(exc, OSError) and not isinstance(exc, VfioUserError) and exc.strerror:
        return exc.strerror
    return str(exc)


def human_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit that keeps it at 1 or more: "512 B",
    "12 KiB", "1.5 MiB" (one decimal below 10)."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            break
        count /= 1024
    if unit == "B":
        return f"{count:.0f} B"
    return f"{count:.1f} {unit}" if count < 10 else f"{count:.0f} {unit}"


class ProgressPrinter:
    """Migration progress on ``out``: a bar redrawn in place on a terminal, else plain lines.

    The stream's length is unknown, so the bar counts phases; bytes and rate go beside it.
    """

    PHASES = (Phase.PRE_COPY, Phase.STOP_COPY, Phase.RESUME, Phase.DONE)
    WIDTH = 24
    #: Seconds between redraws (terminal) or lines (otherwise) within one phase.
    INTERVAL = 0.1
    LINE_INTERVAL = 1.0

    def __init__(self, out: TextIO, *, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self._phase: Phase | None = None
        self._shown = -1.0
        self._drawn = False

    def __call__(self, report: MigrationProgress) -> None:
        changed = report.phase != self._phase
        interval = self.INTERVAL if self.tty else self.LINE_INTERVAL
        if not changed and report.elapsed - self._shown < interval:
            return
        self._phase = report.phase
        self._shown = report.elapsed
        text = f"{report.phase}: {human_bytes(report.phase_bytes)}"
        text += f" ({human_bytes(report.total_bytes)} in all"
        if report.elapsed > 0 and report.total_bytes:
            text += f", {human_bytes(report.total_bytes / report.elapsed)}/s"
        text += ")"
        if self.tty:
            done = self.PHASES.index(report.phase) + 1
            filled = self.WIDTH * done // len(self.PHASES)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.out.write(f"\r\x1b[K[{bar}] {text}")
            self._drawn = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        """End the bar's line (terminal) before anything else is printed."""
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False


def summary_lines(summary: MigrationSummary) -> list[str]:
    """What ``migrate`` prints after a success."""
    lines = [
        f"migrated {human_bytes(summary.bytes)} in {summary.seconds:.3f} s: "
        f"{human_bytes(summary.throughput)}/s, downtime {summary.downtime:.3f} s"
    ]
    for phase, stats in summary.phases.items():
        lines.append(f"  {phase}: {human_bytes(stats.bytes)} in {stats.seconds:.3f} s")
    if summary.dirty is not None:
        pages = sum(report.count for report in summary.dirty)
        lines.append(f"  guest pages dirtied by the device: {pages}")
    lines += [f"  warning: {warning}" for warning in summary.warnings]
    return lines


async def _migrate_sockets(
    args: argparse.Namespace, proposal: Capabilities, printer: ProgressPrinter
) -> MigrationSummary:
    async with (
        connect(args.source, capabilities=proposal) as source,
        connect(args.destination, capabilities=proposal) as destination,
    ):
        return await migrate(
            source,
            destination,
            progress=printer,
            pre_copy=args.pre_copy,
            pre_copy_limit=args.pre_copy_limit,
            # The command maps no guest memory: there is nothing to log.
            track_dirty=False,
        )


def _byte_count(text: str) -> int:
    """A positive byte count, with an optional K, M or G suffix (binary units)."""
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    try:
        count = int(text[:-1] if scale > 1 else text, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if count <= 0:
        raise argparse.ArgumentTypeError(f"not a positive byte count: {text!r}")
    return count


def cmd_migrate(args: argparse.Namespace) -> int:
    """Migrate the device served at SOURCE to the server at DESTINATION; 0 on success."""
    proposal = DEFAULT_CAPABILITIES
    if args.max_data_xfer_size is not None:
        proposal = replace(proposal, max_data_xfer_size=args.max_data_xfer_size)
        try:
            proposal.check()
        except ProtocolError as exc:
            print(f"vfio-user-trio migrate: --max-data-xfer-size: {exc.message}", file=sys.stderr)
            return 2
    printer = ProgressPrinter(sys.stdout, tty=sys.stdout.isatty())
    try:
        summary = trio.run(_migrate_sockets, args, proposal, printer)
    except MigrationError as exc:
        printer.finish()
        print(f"vfio-user-trio migrate: {exc}", file=sys.stderr)
        return 1
    except (OSError, VfioUserError) as exc:
        printer.finish()
        print(f"vfio-user-trio migrate: cannot connect: {exc}", file=sys.stderr)
        return 1
    printer.finish()
    print("\n".join(summary_lines(summary)))
    return 0


def cmd_conform(args: argparse.Namespace) -> int:
    """Run the conformance catalogue against a server; 1 on any FAIL (or WARN with --strict)."""
    from .testing import conformance  # noqa: PLC0415 - only this command needs the checker

    try:
        checks = conformance.select(args.only, args.skip)
    except ValueError as exc:
        print(f"vfio-user-trio conform: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print(conformance.catalogue_markdown(), end="")
        return 0
    if (args.socket is None) == (args.fd is None):
        print("vfio-user-trio conform: give exactly one of SOCKET and --fd N", file=sys.stderr)
        return 2
    target: conformance.Target
    if args.fd is not None:
        target = conformance.FdTarget(args.fd)
    else:
        try:
            os.stat(args.socket)  # a wrong path is one line, not a FAIL per check
        except OSError as exc:
            print(f"vfio-user-trio conform: {args.socket}: {_describe(exc)}", file=sys.stderr)
            return 1
        target = conformance.PathTarget(args.socket)

    def show(result: conformance.Result) -> None:
        if not args.json:
            single = conformance.Report(target.label, (result,))
            print("\n".join(single.lines()[:-1]), flush=True)

    report = trio.run(
        partial(conformance.run_checks, target, checks=checks, timeout=args.timeout, on_result=show)
    )
    print(report.to_json() if args.json else report.summary())
    return 1 if report.failed(strict=args.strict) else 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmarks: the ``bench`` package of the checkout this package runs from.

    The benchmarks are not installed with the package. An installed package never imports a
    ``bench`` found elsewhere (the current directory, say): it would measure another tree.
    """
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(checkout, "bench", "run.py")):
        raise SystemExit(
            "vfio-user-trio bench: the benchmarks are not installed with the package; "
            "run them from a source checkout (pip install -e . there, or python -m bench)"
        )
    if sys.path[:1] != [checkout]:
        sys.path.insert(0, checkout)  # this checkout's bench, ahead of any other
    from bench.run import main as bench_main  # noqa: PLC0415 - only this command needs it

    return int(bench_main(args.args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfio-user-trio", description="vfio-user devices and clients on trio"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages (and tracebacks)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the gpio example and a client in one process")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="serve a device on a UNIX socket")
    serve.add_argument("device", help=f"example name ({', '.join(EXAMPLES)}) or module:attribute")
    serve.add_argument("--socket-path", metavar="PATH", help="UNIX socket path to listen on")
    serve.add_argument(
        "--fd", type=int, metavar="N", help="inherited socket fd (listening or connected)"
    )
    serve.add_argument(
        "--once",
        action="store_true",
        help="serve one client, then exit (the socket file is removed), as libvfio-user's "
        "samples do",
    )
    serve.add_argument(
        "--policy",
        metavar="POLICY",
        help=f"ordering policy for every client: {', '.join(POLICIES)} or module:Class "
        "(default spec; see docs/ordering.md)",
    )
    serve.add_argument("--backing", metavar="FILE", help="nvme: keep the namespace in FILE")
    serve.add_argument(
        "--size", metavar="N", type=_byte_count, help="nvme: namespace size, e.g. 64M"
    )
    serve.set_defaults(func=cmd_serve)

    describe_cmd = sub.add_parser(
        "describe",
        help="print the JSON description of serving a device (for /usr/share/vfio-user)",
        description="Print the JSON file the vfio-user spec's backend program conventions ask "
        "to install under /usr/share/vfio-user: vhost-user's fields (description, type, "
        "binary, tags) and args, what goes between binary and --socket-path=PATH.",
    )
    describe_cmd.add_argument(
        "device", help=f"example name ({', '.join(EXAMPLES)}) or module:attribute"
    )
    describe_cmd.set_defaults(func=cmd_describe)

    lspci = sub.add_parser("lspci", help="print a server's config space as lspci -x does")
    lspci.add_argument("socket", help="path of the server's UNIX socket")
    lspci.add_argument(
        "-x",
        dest="dump",
        action="count",
        default=0,
        help="like lspci: -x 64 bytes, -xxx 256, -xxxx 4096 (default: the whole space)",
    )
    lspci.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_NEGOTIATION_TIMEOUT,
        metavar="SECONDS",
        help="give up on a server that has not negotiated within SECONDS, e.g. one busy "
        f"with another client (default {DEFAULT_NEGOTIATION_TIMEOUT:g}; 0 waits for ever)",
    )
    lspci.set_defaults(func=cmd_lspci)

    migrate_cmd = sub.add_parser(
        "migrate",
        help="live-migrate a device from one server to another",
        description="Move the device state of the server at SOURCE to the one at DESTINATION "
        "(both UNIX socket paths; neither device may have another client attached). The "
        "destination is left running; the source is stopped, and runs again, with no client "
        "memory, once this command disconnects from it. On failure the exit status is 1 "
        "and the message names the failed step; see vfiouser_trio.client.migrate.",
    )
    migrate_cmd.add_argument("source", help="socket path of the server to migrate from")
    migrate_cmd.add_argument("destination", help="socket path of the server to migrate to")
    migrate_cmd.add_argument(
        "--pre-copy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require PRE_COPY, or skip it (default: use it when the source offers it). "
        "--no-pre-copy for a destination that takes only the STOP_COPY data, as "
        "libvfio-user's sample server does",
    )
    migrate_cmd.add_argument(
        "--pre-copy-limit",
        type=_byte_count,
        metavar="BYTES",
        help="move at most this much in PRE_COPY, then stop the source",
    )
    migrate_cmd.add_argument(
        "--max-data-xfer-size",
        type=_byte_count,
        metavar="BYTES",
        help="the largest transfer this client proposes (default 1 MiB); migration data "
        "moves in pieces of at most this and each server's own limit",
    )
    migrate_cmd.set_defaults(func=cmd_migrate)

    conform = sub.add_parser(
        "conform",
        help="check a vfio-user server against the spec (see docs/conformance.md)",
        description="Connect to the server at SOCKET as a client, as often as needed, and run "
        "the numbered checks: one line each, PASS, FAIL, WARN or SKIP with the spec section, and "
        "for a failure what was sent, received and expected. Exit status 1 on any FAIL.",
    )
    conform.add_argument("socket", nargs="?", help="path of the server's UNIX socket")
    conform.add_argument(
        "--fd",
        type=int,
        metavar="N",
        help="an inherited socket connected to the server (one "
        "connection: checks that need another are skipped)",
    )
    conform.add_argument("--json", action="store_true", help="print the report as JSON")
    conform.add_argument(
        "--only", action="append", metavar="ID|GROUP", help="run only these checks (repeatable)"
    )
    conform.add_argument(
        "--skip", action="append", metavar="ID|GROUP", help="leave these checks out (repeatable)"
    )
    conform.add_argument("--strict", action="store_true", help="exit 1 on a WARN too")
    conform.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="stop a check that takes longer and report it (default 5)",
    )
    conform.add_argument("--list", action="store_true", help="print the catalogue and exit")
    conform.set_defaults(func=cmd_conform)

    bench = sub.add_parser("bench", help="run the benchmarks (see docs/performance.md)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to the benchmark runner, options included.
        bench_args = argparse.Namespace(args=argv[1:])
        return run_command(partial(cmd_bench, bench_args), "vfio-user-trio bench")
    args = build_parser().parse_args(argv)
    quiet = args.command == "demo"  # the tour's own output is the point there
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    return run_command(partial(args.func, args), f"vfio-user-trio {args.command}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
