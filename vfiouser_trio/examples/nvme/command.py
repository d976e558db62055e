"""A submission queue entry, decoded, and how a command's data crosses the PRPs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .spec import SQE

if TYPE_CHECKING:
    from .controller import NvmeController


@dataclass(frozen=True, slots=True)
class Command:
    """The fields of a 64-byte submission queue entry the controller reads."""

    opcode: int
    fuse: int
    psdt: int
    cid: int
    nsid: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def parse(cls, raw: bytes) -> Command:
        cdw0, nsid, _, _, prp1, prp2, *cdws = SQE.unpack(raw)
        return cls(
            cdw0 & 0xFF, (cdw0 >> 8) & 0x3, (cdw0 >> 14) & 0x3, cdw0 >> 16, nsid, prp1, prp2, *cdws
        )


#: A handler's outcome: (status, DW0 result), or HELD for a command that completes later
#: (an Asynchronous Event Request).
Outcome = tuple[int, int] | None
HELD: Outcome = None

#: A command handler: the controller and the command in, the outcome out.
Handler = Callable[["NvmeController", Command], Awaitable[Outcome]]
