"""Render config space as the hex dump ``lspci -n -xxx`` / ``-xxxx`` prints.

The text is what ``lspci -F FILE`` reads back: a device line "BB:DD.F class: vendor:device",
then one line per 16 bytes ("XX: hh hh ..."), then a blank line.
"""

from __future__ import annotations

import re

_BDF = re.compile(r"(?:[0-9a-f]{4,5}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_DUMP_SIZES = (64, 256, 4096)  # lspci -x, -xxx, -xxxx


def format_lspci_hex(config: bytes, *, bdf: str = "00:00.0") -> str:
    """Format ``config`` (64, 256 or 4096 bytes) like ``lspci -n -x``/``-xxx``/``-xxxx``.

    ``bdf`` is "BB:DD.F" or "DDDD:BB:DD.F" in lower-case hex, as lspci prints it.
    """
    if len(config) not in _DUMP_SIZES:
        raise ValueError(f"config dump must be 64, 256 or 4096 bytes, not {len(config)}")
    if not _BDF.fullmatch(bdf):
        raise ValueError(f"bad bus/device/function {bdf!r}")
    vendor = int.from_bytes(config[0:2], "little")
    device = int.from_bytes(config[2:4], "little")
    revision = config[8]
    device_class = int.from_bytes(config[10:12], "little")  # base class and subclass
    title = f"{bdf} {device_class:04x}: {vendor:04x}:{device:04x}"
    if revision:
        title += f" (rev {revision:02x})"
    lines = [title]
    for offset in range(0, len(config), 16):
        row = " ".join(f"{byte:02x}" for byte in config[offset : offset + 16])
        lines.append(f"{offset:02x}: {row}")
    return "\n".join(lines) + "\n\n"
