"""``vfio-user-trio lspci``: look at any vfio-user server from the outside.

Prints the device's configuration space in the hex format of ``lspci -x`` (so
``lspci -vvv -F FILE`` from pciutils decodes it), followed by a summary of the
regions and IRQs as comment lines starting with ``#``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .client import DEFAULT_NEGOTIATION_TIMEOUT, connect
from .lspci_format import format_lspci_hex
from .protocol.constants import PciIrq, PciRegion

REGION_NAMES = {r.value: r.name for r in PciRegion}
IRQ_NAMES = {i.value: i.name for i in PciIrq}

#: How many bytes each -x level shows, as lspci does: -x 64, -xxx 256, -xxxx 4096.
DUMP_SIZES = {1: 64, 2: 256, 3: 256, 4: 4096}


async def lspci(
    path: str | os.PathLike[str],
    *,
    level: int = 4,
    out: Callable[[str], None] = print,
    negotiation_timeout: float | None = DEFAULT_NEGOTIATION_TIMEOUT,
) -> None:
    """Connect to the server at ``path``, print its config space dump and a summary.

    A server that does not negotiate within ``negotiation_timeout`` seconds (one that is
    busy with another client, or hung) raises ``NegotiationTimeout``.
    """
    async with connect(path, negotiation_timeout=negotiation_timeout) as client:
        dump = await client.config.dump()
        size = min(DUMP_SIZES.get(level, 4096), len(dump))
        out(format_lspci_hex(dump[:size]).rstrip("\n"))
        out("")
        info = client.info
        out(
            f"# {info.num_regions} regions, {info.num_irqs} IRQ types, "
            f"reset {'yes' if info.supports_reset else 'no'}"
        )
        for index, region in sorted(client.regions.items()):
            if not region.size:
                continue
            flags = ("r" if region.readable else "-") + ("w" if region.writable else "-")
            flags += "m" if region.mmappable else "-"
            extra = ""
            if region.sparse_areas:
                areas = ", ".join(f"{a.offset:#x}+{a.size:#x}" for a in region.sparse_areas)
                extra += f" sparse mmap [{areas}]"
            if region.region_type is not None:
                extra += f" type {region.region_type.type:#x}/{region.region_type.subtype:#x}"
            name = REGION_NAMES.get(index, f"REGION{index}")
            out(f"# region {index} {name:<6} size {region.size:#x} {flags}{extra}")
        for index, irq in sorted(client.irq_info.items()):
            if irq.count:
                out(
                    f"# irq {index} {IRQ_NAMES.get(index, str(index)):<5} count {irq.count} "
                    f"flags {irq.flags:#x}"
                )
