"""An interleaving explorer: one scenario under many schedules, to test an ordering policy.

A :class:`Scenario` names a device, a client workload and the server's policy. Each run is a
fresh ``trio.run`` on virtual time whose choice points (message arrival, preserving the
client's order; handler latency; the engine's batching; optionally trio's scheduling) are
answered by a schedule. :func:`explore` tries schedules from a strategy (:class:`Random`,
:class:`PCT`, :class:`Exhaustive`) and checks the invariants (reads-see-writes over
``memory_regions``, the spec's order minus the policy's declared relaxations, no hang within
``budget`` (with the wait-for graph of both sides), the scenario's own); a failure comes back as
a shrunk, printable :class:`Schedule` that :func:`replay` runs again, and as the text of a
regression test. See docs/explore.md.
"""

from ._run import Event, Invariant, Run, Scenario, execute, reads_see_writes, spec_order
from ._schedule import Choice, Chooser, DrawingChooser, Schedule
from ._search import (
    PCT,
    Exhaustive,
    Failure,
    Random,
    Report,
    Strategy,
    explore,
    replay,
    shrink,
)

__all__ = [
    "PCT",
    "Choice",
    "Chooser",
    "DrawingChooser",
    "Event",
    "Exhaustive",
    "Failure",
    "Invariant",
    "Random",
    "Report",
    "Run",
    "Scenario",
    "Schedule",
    "Strategy",
    "execute",
    "explore",
    "reads_see_writes",
    "replay",
    "shrink",
    "spec_order",
]
