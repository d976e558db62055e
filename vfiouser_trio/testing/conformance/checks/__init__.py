"""The catalogue: importing this package registers every check, group by group."""

from . import commands, config, dma, framing, irqs, migration, negotiation, region_io, robustness  # noqa: F401
