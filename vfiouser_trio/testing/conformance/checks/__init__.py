"""The catalogue: importing this package registers every check, group by group."""

from . import (
    commands,
    config,
    disconnect,
    dma,
    framing,
    irqs,
    migration,
    negotiation,
    region_io,
    robustness,
)

__all__ = [
    "commands",
    "config",
    "disconnect",
    "dma",
    "framing",
    "irqs",
    "migration",
    "negotiation",
    "region_io",
    "robustness",
]
