"""The ``vfio-user-trio`` command: demo, serve, lspci, migrate, bench."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import TextIO

import trio

from .client import MigrationError, MigrationProgress, MigrationSummary, Phase, connect, migrate
from .demo import run as run_demo
from .examples import EXAMPLES
from .inspector import lspci
from .protocol.errors import VfioUserError
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
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        known = ", ".join(sorted(EXAMPLES))
        raise SystemExit(f"unknown device {spec!r}: use one of {known} or module:attribute")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"cannot load device {spec!r}: {exc}") from exc
    if not callable(target):
        raise SystemExit(f"{spec!r} is not a Device class or factory")
    return target  # type: ignore[no-any-return]


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
    """Serve a device per the spec's backend conventions (never daemonizes, logs to stderr)."""
    if (args.socket_path is None) == (args.fd is None):
        raise SystemExit("give exactly one of --socket-path=PATH and --fd=N")
    factory = load_device_factory(args.device)
    device = factory()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, device, args.socket_path, fd=args.fd))
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


def _listener_error(exc: BaseException) -> ListenerError | None:
    """The ListenerError that is all ``exc`` is (possibly inside nested groups), else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, ListenerError) else None


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the gpio example and drive it with the client, printing the tour."""
    return run_demo()


def cmd_lspci(args: argparse.Namespace) -> int:
    """Print a server's config space as ``lspci -x`` does, then a region/IRQ summary."""
    trio.run(partial(lspci, args.socket, level=min(args.dump, 4)))
    return 0


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


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
        rate = report.total_bytes / report.elapsed / 1e6 if report.elapsed > 0 else 0.0
        text = f"{report.phase}: {_mib(report.phase_bytes)} ({_mib(report.total_bytes)} in all"
        text += f", {rate:.1f} MB/s)"
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
        f"migrated {_mib(summary.bytes)} in {summary.seconds:.3f} s: "
        f"{summary.throughput / 1e6:.1f} MB/s, downtime {summary.downtime:.3f} s"
    ]
    for phase, stats in summary.phases.items():
        lines.append(f"  {phase}: {_mib(stats.bytes)} in {stats.seconds:.3f} s")
    if summary.dirty is not None:
        pages = sum(report.count for report in summary.dirty)
        lines.append(f"  guest pages dirtied by the device: {pages}")
    lines += [f"  warning: {warning}" for warning in summary.warnings]
    return lines


async def _migrate_sockets(
    source_path: str, destination_path: str, printer: ProgressPrinter
) -> MigrationSummary:
    async with connect(source_path) as source, connect(destination_path) as destination:
        return await migrate(source, destination, progress=printer)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Migrate the device served at SOURCE to the server at DESTINATION; 0 on success."""
    printer = ProgressPrinter(sys.stdout, tty=sys.stdout.isatty())
    try:
        summary = trio.run(_migrate_sockets, args.source, args.destination, printer)
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


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmarks (a source checkout's ``bench`` package)."""
    try:
        # The benchmarks are not installed with the package: they run from a checkout.
        from bench.run import main as bench_main  # noqa: PLC0415
    except ImportError:
        raise SystemExit("the benchmarks live in the source tree: run from a checkout") from None
    return int(bench_main(args.args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfio-user-trio", description="vfio-user devices and clients on trio"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the gpio example and a client in one process")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="serve a device on a UNIX socket")
    serve.add_argument("device", help="example name (gpio, null, dmaengine) or module:attribute")
    serve.add_argument("--socket-path", metavar="PATH", help="UNIX socket path to listen on")
    serve.add_argument(
        "--fd", type=int, metavar="N", help="inherited socket fd (listening or connected)"
    )
    serve.set_defaults(func=cmd_serve)

    lspci = sub.add_parser("lspci", help="print a server's config space as lspci -x does")
    lspci.add_argument("socket", help="path of the server's UNIX socket")
    lspci.add_argument(
        "-x",
        dest="dump",
        action="count",
        default=0,
        help="like lspci: -x 64 bytes, -xxx 256, -xxxx 4096 (default: the whole space)",
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
    migrate_cmd.set_defaults(func=cmd_migrate)

    bench = sub.add_parser("bench", help="run the benchmarks (see docs/performance.md)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to the benchmark runner, options included.
        return cmd_bench(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    quiet = args.command == "demo"  # the tour's own output is the point there
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
