"""Running checks against a target, each under its own timeout, and the report."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from .context import Expectations, Probe
from .model import SPEC_URL, Check, Level, Outcome, Result, Skipped, Violation, select
from .wire import NoMoreConnections, Target

#: Seconds one check may take before it is stopped and reported FAIL (or WARN).
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Report:
    """The results of one run, in catalogue order."""

    target: str
    results: tuple[Result, ...]

    def count(self, outcome: Outcome) -> int:
        return sum(r.outcome is outcome for r in self.results)

    def failed(self, *, strict: bool = False) -> bool:
        """Any FAIL (with ``strict``, any WARN too): the run's exit status is non-zero."""
        bad = {Outcome.FAIL, Outcome.WARN} if strict else {Outcome.FAIL}
        return any(r.outcome in bad for r in self.results)

    def problems(self, *, strict: bool = False) -> list[Result]:
        bad = {Outcome.FAIL, Outcome.WARN} if strict else {Outcome.FAIL}
        return [r for r in self.results if r.outcome in bad]

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(o)} {o.value}" for o in Outcome)
        return f"{self.target}: {len(self.results)} checks: {counts}"

    def lines(self) -> list[str]:
        """One line per check; under it what the check saw or why it did not pass, and for
        FAIL/WARN what was sent, received and expected."""
        out = []
        for r in self.results:
            c = r.check
            line = f"{r.outcome.value:4}  {c.id}  {c.level.value:6}  [{c.section}] {c.title}"
            out.append(line)
            if r.message:
                out.append(f"        {r.message}")
            if r.outcome in (Outcome.FAIL, Outcome.WARN):
                for label, text in (
                    ("sent", r.sent),
                    ("received", r.received),
                    ("expected", r.expected),
                ):
                    if text:
                        out.append(f"        {label}: {text}")
        out.append(self.summary())
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "target": self.target,
                "spec": SPEC_URL,
                "results": [r.to_dict() for r in self.results],
                "summary": {o.value: self.count(o) for o in Outcome},
            },
            indent=2,
        )


async def run_checks(
    target: Target,
    *,
    checks: Sequence[Check] | None = None,
    expectations: Expectations | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_result: Callable[[Result], None] | None = None,
) -> Report:
    """Run ``checks`` (default: the whole catalogue) against ``target``, one after another.

    Each check gets its own connections (closed when it ends) and at most ``timeout``
    seconds: a server that never answers makes that check FAIL (or WARN), never the run hang.
    ``on_result`` sees each result as it is made (the CLI prints as it goes).
    """
    chosen = list(checks) if checks is not None else select()
    expect = expectations or Expectations()
    state: dict[str, object] = {}
    results = []
    for check in chosen:
        result = await _run_one(check, target, expect, state, timeout)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return Report(target.label, tuple(results))


async def _run_one(
    check: Check, target: Target, expect: Expectations, state: dict[str, object], timeout: float
) -> Result:
    waived = expect.waive.get(check.id) or expect.waive.get(check.group)
    if waived is not None:
        return Result(check, Outcome.SKIP, f"waived: {waived}")
    probe = Probe(target, expect, state)
    start = trio.current_time()
    outcome, message, sent, received, expected = Outcome.PASS, "", "", "", ""
    try:
        with trio.move_on_after(timeout) as scope:
            found = await check.func(probe)
            message = "; ".join(probe.notes + ([found] if found else []))
            if probe.concerns:
                first = probe.concerns[0]
                outcome, sent, received, expected = (
                    Outcome.WARN,
                    first.sent,
                    first.received,
                    first.expected,
                )
                more = len(probe.concerns) - 1
                message = first.message + (f" (and {more} more)" if more else "")
        if scope.cancelled_caught:
            outcome = _violated(check)
            message = f"no answer within {timeout:g} s"
            sent = probe.last_sent
            expected = "an answer (or the connection closed)"
    except Violation as exc:
        outcome, message = _violated(check), exc.message
        sent, received, expected = exc.sent, exc.received, exc.expected
    except (Skipped, NoMoreConnections) as exc:
        outcome, message = Outcome.SKIP, str(exc)
    except OSError as exc:
        outcome, message = Outcome.FAIL, f"cannot reach the server: {exc}"
    except Exception as exc:
        # A device author's dma_trigger, or a checker bug: one FAIL, and the run goes on.
        outcome, message = Outcome.FAIL, f"the check raised {type(exc).__name__}: {exc}"
        sent = probe.last_sent
    finally:
        probe.close()
    return Result(check, outcome, message, sent, received, expected, trio.current_time() - start)


def _violated(check: Check) -> Outcome:
    return Outcome.FAIL if check.level is Level.MUST else Outcome.WARN


def catalogue_markdown() -> str:
    """The catalogue as the Markdown table docs/conformance.md carries (generated, not edited)."""
    rows = ["| id | level | spec section | the server ... |", "|---|---|---|---|"]
    group = None
    for c in select():
        if c.group != group:
            group = c.group
            rows.append(f"| **{group}** | | | |")
        rows.append(f"| `{c.id}` | {c.level.value} | {c.section} | {c.title} |")
    return "\n".join(rows) + "\n"
