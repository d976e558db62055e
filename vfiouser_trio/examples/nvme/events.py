"""Asynchronous events that wait for an Asynchronous Event Request (NVMe 1.4, section 5.2).

An event of a kind here is reported once, completing a held AER (or the next one), and the
kind is then masked: another waits until the host reads the event's log page with RAE
(Retain Asynchronous Event) clear. Error events (bad doorbells) are simpler and live in the
controller: one meanwhile is dropped, as nothing else would report it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MaskedEvent:
    """One kind of event: the AER result it completes with, whether one waits for an AER,
    and whether the kind is masked until its log page is read."""

    result: int
    pending: bool = False
    masked: bool = False

    def take(self) -> int | None:
        """The result to report now, if one waits and the kind is not masked (masking it)."""
        if not self.pending or self.masked:
            return None
        self.pending, self.masked = False, True
        return self.result

    def log_read(self, retain: bool) -> None:
        """The host read the event's log page; with RAE clear the kind is unmasked."""
        if not retain:
            self.masked = False
