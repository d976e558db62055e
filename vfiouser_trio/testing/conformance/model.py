"""What a conformance check is, what it reports, and the catalogue they are registered in.

A check is an async function taking a :class:`~.context.Probe`, registered with
:func:`check`. It returns (optionally what it observed) to PASS, or raises
:class:`Violation` (through ``probe.fail``) or :class:`Skipped` (``probe.skip``);
``probe.warn`` records a lesser problem and lets it go on. A violation of a MUST check is a
FAIL; of a SHOULD check, and any lesser problem, a WARN (``--strict`` counts it as a
failure). INFO checks only observe: they PASS with what they saw, or SKIP.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Probe

SPEC_URL = "https://www.qemu.org/docs/master/interop/vfio-user.html"


class Level(enum.Enum):
    """How binding the rule a check tests is."""

    #: The spec says so: a violation is a FAIL.
    MUST = "MUST"
    #: What deployed clients (QEMU, libvfio-user) depend on, or the spec's intent where it is
    #: silent: a violation is a WARN.
    SHOULD = "SHOULD"
    #: An observation (what is offered or supported); never fails.
    INFO = "INFO"


class Outcome(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    WARN = "WARN"
    SKIP = "SKIP"


class Violation(Exception):
    """The server broke the rule a check tests: what was sent, received and expected."""

    def __init__(self, message: str, *, sent: str = "", received: str = "", expected: str = ""):
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.received = received
        self.expected = expected


class Warned(Violation):
    """A lesser problem (``probe.warn``), reported WARN whatever the check's level."""


class Skipped(Exception):
    """The check does not apply to this server (or was waived)."""


CheckFunc = Callable[["Probe"], Awaitable[str | None]]

_ID = re.compile(r"^[a-z]+-\d{2}$")


@dataclass(frozen=True, slots=True)
class Check:
    """One numbered check of the catalogue."""

    #: ``neg-01``: the group's prefix and a number, stable across releases.
    id: str
    #: The group name (``negotiation``); ``--only``/``--skip`` take ids or groups.
    group: str
    level: Level
    #: The spec section the rule is in (its title in the spec's text).
    section: str
    #: One line: the rule, as a statement the server meets.
    title: str
    func: CheckFunc = field(repr=False, compare=False)


#: The groups, in the order a run takes them (and the catalogue lists them).
GROUPS = (
    "negotiation",
    "framing",
    "commands",
    "region_io",
    "config",
    "irqs",
    "dma",
    "migration",
    "disconnect",
    "robustness",
)

#: Every registered check, by id, in registration order (the catalogue order).
CATALOGUE: dict[str, Check] = {}


def check(
    id: str, group: str, level: Level, section: str, title: str
) -> Callable[[CheckFunc], CheckFunc]:
    """Register ``func`` as check ``id`` (a decorator)."""
    if not _ID.match(id):
        raise ValueError(f"check id {id!r} is not like 'neg-01'")

    def register(func: CheckFunc) -> CheckFunc:
        if id in CATALOGUE:
            raise ValueError(f"check {id} registered twice")
        CATALOGUE[id] = Check(id, group, level, section, title, func)
        return func

    return register


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one check against one server."""

    check: Check
    outcome: Outcome
    #: Why (for FAIL/WARN/SKIP) or what was observed (PASS of an INFO check); may be empty.
    message: str = ""
    sent: str = ""
    received: str = ""
    expected: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.check.id,
            "group": self.check.group,
            "level": self.check.level.value,
            "section": self.check.section,
            "title": self.check.title,
            "outcome": self.outcome.value,
            "message": self.message,
            "sent": self.sent,
            "received": self.received,
            "expected": self.expected,
            "seconds": round(self.seconds, 4),
        }


def select(only: list[str] | None = None, skip: list[str] | None = None) -> list[Check]:
    """The checks named by id or group in ``only`` (all when None), minus those in ``skip``.

    An unknown name is a ValueError (a typo must not silently select nothing).
    """
    from . import checks as _catalogue  # noqa: F401, PLC0415 - registers every check

    names = {c.id for c in CATALOGUE.values()} | {c.group for c in CATALOGUE.values()}
    for name in (only or []) + (skip or []):
        if name not in names:
            raise ValueError(f"no check or group named {name!r}")
    ordered = sorted(CATALOGUE.values(), key=lambda c: (_group_rank(c.group), c.id))
    chosen = [c for c in ordered if only is None or c.id in only or c.group in only]
    return [c for c in chosen if not skip or (c.id not in skip and c.group not in skip)]


def _group_rank(group: str) -> int:
    return GROUPS.index(group) if group in GROUPS else len(GROUPS)
