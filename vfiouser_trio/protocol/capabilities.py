"""Capabilities exchanged in VFIO_USER_VERSION (spec: Version, "Capabilities").

``Capabilities`` describes one side: what it can *receive* (max_msg_fds,
max_data_xfer_size) and what it supports. The same class serves the client's
proposal and the server's reply. Unknown or legacy entries (libvfio-user's and
QEMU's ``"migration": {"pgsize": 4096}``) are kept verbatim in ``extra`` and are
never a reason to reject a peer (a newer minor version may add capabilities, and
the reply must stay a subset of the proposal), but their size and nesting are
bounded like the rest.

Every value a peer sends is checked against :data:`CAPABILITY_BOUNDS`, in both
directions (a client's proposal and a server's reply), before anything uses it:
a value out of range, of the wrong JSON type (``true`` is not a number), or a
capability block that is not an object is refused with ``ProtocolError``
(EINVAL) naming the capability. The document itself is bounded too: at most
:data:`MAX_VERSION_JSON_SIZE` characters nested at most :data:`MAX_JSON_DEPTH`
deep, checked before it is parsed, so a hostile peer can neither make the
parser recurse without end nor make us hold a large document.
Spec: https://www.qemu.org/docs/master/interop/vfio-user.html, "Version".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from .constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
    MAX_MSG_FDS_LIMIT,
)
from .errors import ProtocolError

_U64_MAX = (1 << 64) - 1

#: Longest version-data JSON accepted, in characters. Real peers send a few hundred
#: (QEMU's proposal is about 250); the bound keeps parsing and ``extra`` small.
MAX_VERSION_JSON_SIZE: Final = 4 << 10
#: Deepest nesting of JSON arrays/objects accepted in version data. The spec's own
#: document is 3 deep (``{"capabilities": {"twin_socket": {...}}}``); a bound far
#: below the interpreter's recursion limit means the parser can never recurse away.
MAX_JSON_DEPTH: Final = 16
#: Smallest page size (4 KiB) a ``pgsizes`` bit or a legacy ``migration.pgsize`` may name.
MIN_PAGE_SIZE: Final = 4096
#: Smallest ``max_data_xfer_size``: room for a whole standard PCI config header, one
#: REGION_WRITE_MULTI entry, or a 64-bit dirty-bitmap word in one transfer. Anything
#: smaller cannot drive a device; 0 would even make splitting transfers impossible.
MIN_DATA_XFER_SIZE: Final = 64
#: Largest ``max_data_xfer_size``: 1 GiB. A message's ``msg_size`` is a u32, so a
#: transfer must stay well below 4 GiB; no implementation uses more than a few MiB.
MAX_DATA_XFER_SIZE: Final = 1 << 30
#: Largest ``max_dma_maps``: the kernel's VFIO type1 ``dma_entry_limit`` is a u32.
MAX_DMA_MAPS: Final = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class Bounds:
    """The inclusive range ``[low, high]`` a numeric capability must lie in."""

    low: int
    high: int
    #: True when the value must be a power of two (a page size).
    power_of_two: bool = False


#: The accepted range of every numeric capability, the one place they are stated.
#: The same rules apply to a client's proposal and to a server's reply.
#:
#: ============================  ===============  ====================================
#: capability                    accepted         why
#: ============================  ===============  ====================================
#: ``max_msg_fds``               1 .. 1024        the spec's default is 1; a side
#:                                                taking no fds gets no memory or fds
#: ``max_data_xfer_size``        64 .. 1 GiB      see MIN_/MAX_DATA_XFER_SIZE
#: ``max_dma_maps``              1 .. 2^32-1      0 maps would forbid all DMA
#: ``pgsizes``                   4 KiB .. 2^64-1  non-zero, no bit below 4 KiB
#: ``twin_socket.fd_index``      0 .. 1023        an index into the reply's fds
#: ``migration.pgsize``          power of two     legacy (libvfio-user, QEMU)
#:                               4 KiB .. 2^63
#: ``migration.max_bitmap_size`` 1 .. 2^64-1      legacy (QEMU)
#: ============================  ===============  ====================================
CAPABILITY_BOUNDS: Final[Mapping[str, Bounds]] = MappingProxyType(
    {
        "max_msg_fds": Bounds(1, MAX_MSG_FDS_LIMIT),
        "max_data_xfer_size": Bounds(MIN_DATA_XFER_SIZE, MAX_DATA_XFER_SIZE),
        "max_dma_maps": Bounds(1, MAX_DMA_MAPS),
        "pgsizes": Bounds(MIN_PAGE_SIZE, _U64_MAX),
        "twin_socket.fd_index": Bounds(0, MAX_MSG_FDS_LIMIT - 1),
        "migration.pgsize": Bounds(MIN_PAGE_SIZE, 1 << 63, power_of_two=True),
        "migration.max_bitmap_size": Bounds(1, _U64_MAX),
    }
)


@dataclass(frozen=True, slots=True)
class TwinSocket:
    """The ``twin_socket`` capability object.

    In a proposal only ``supported`` is meaningful; in a reply that enables
    twin-socket mode ``fd_index`` names the fd (of those sent with the reply)
    that is the client's end of the server-to-client command socket.
    """

    supported: bool = False
    fd_index: int | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"supported": self.supported}
        if self.fd_index is not None:
            out["fd_index"] = self.fd_index
        return out


@dataclass(frozen=True, slots=True)
class Capabilities:
    """One side's capabilities; absent entries take the spec's defaults.

    ``extra`` holds every entry this class does not model, as
    ``(name, compact JSON text)`` pairs in arrival order, so it stays hashable
    and round-trips unchanged (see ``extra_value``).
    """

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    twin_socket: TwinSocket | None = None
    write_multiple: bool = False
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def twin_supported(self) -> bool:
        """True if ``twin_socket.supported`` is true."""
        return self.twin_socket is not None and self.twin_socket.supported

    def extra_value(self, name: str) -> object:
        """The decoded value of an unmodelled entry (KeyError if absent)."""
        for key, text in self.extra:
            if key == name:
                return json.loads(text)
        raise KeyError(name)

    @staticmethod
    def extra_from(entries: Mapping[str, object]) -> tuple[tuple[str, str], ...]:
        """Build an ``extra`` tuple from plain values, e.g. ``{"migration": {"pgsize": 4096}}``."""
        return tuple((k, json.dumps(v, separators=(",", ":"))) for k, v in entries.items())

    def to_dict(self) -> dict[str, object]:
        """The ``capabilities`` JSON object. Limits are always written explicitly."""
        out: dict[str, object] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsizes,
        }
        if self.twin_socket is not None:
            out["twin_socket"] = self.twin_socket.to_dict()
        if self.write_multiple:
            out["write_multiple"] = True
        for key, text in self.extra:
            out[key] = json.loads(text)
        return out

    def to_json(self) -> str:
        """The whole version-data document: ``{"capabilities":{...}}``, compact."""
        return json.dumps({"capabilities": self.to_dict()}, separators=(",", ":"))

    def check(self) -> None:
        """Refuse (ProtocolError EINVAL, naming it) a value outside :data:`CAPABILITY_BOUNDS`.

        ``from_dict`` runs this on everything a peer sends; run it on capabilities of
        our own before advertising them.
        """
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            _check_bounds(name, getattr(self, name))
        if self.twin_socket is not None and self.twin_socket.fd_index is not None:
            _check_bounds("twin_socket.fd_index", self.twin_socket.fd_index)
        if self.pgsizes & (MIN_PAGE_SIZE - 1):
            raise ProtocolError(
                f"pgsizes {self.pgsizes:#x} names a page size below {MIN_PAGE_SIZE:#x}"
            )

    @classmethod
    def from_dict(cls, caps: object) -> Capabilities:
        """Validate and decode a ``capabilities`` object; ProtocolError (EINVAL) if malformed."""
        if not isinstance(caps, dict):
            raise ProtocolError("capabilities is not a JSON object")
        twin: TwinSocket | None = None
        if "twin_socket" in caps:
            twin = _twin_entry(caps["twin_socket"])
        write_multiple = caps.get("write_multiple", False)
        if not isinstance(write_multiple, bool):
            raise ProtocolError("write_multiple is not a boolean")
        if "migration" in caps:
            _check_migration(caps["migration"])
        extra = tuple(
            (str(k), json.dumps(v, separators=(",", ":")))
            for k, v in caps.items()
            if k not in _MODELLED
        )
        decoded = cls(
            max_msg_fds=_int_entry(caps, "max_msg_fds", DEFAULT_MAX_MSG_FDS),
            max_data_xfer_size=_int_entry(caps, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE),
            max_dma_maps=_int_entry(caps, "max_dma_maps", DEFAULT_MAX_DMA_MAPS),
            pgsizes=_int_entry(caps, "pgsizes", DEFAULT_PGSIZES),
            twin_socket=twin,
            write_multiple=write_multiple,
            extra=extra,
        )
        decoded.check()
        return decoded

    @classmethod
    def from_json(cls, text: str) -> Capabilities | None:
        """Decode a version-data document; None when it has no ``capabilities``.

        Raises ProtocolError (EINVAL) for a document longer than
        :data:`MAX_VERSION_JSON_SIZE` or nested deeper than :data:`MAX_JSON_DEPTH`
        (both checked before parsing), unparsable JSON, a top level that is not an
        object, or a malformed ``capabilities`` entry.
        """
        if len(text) > MAX_VERSION_JSON_SIZE:
            raise ProtocolError(
                f"version JSON of {len(text)} characters exceeds {MAX_VERSION_JSON_SIZE}"
            )
        if not _within_depth(text, MAX_JSON_DEPTH):
            raise ProtocolError(
                f"unparsable version JSON: nested deeper than {MAX_JSON_DEPTH} or unbalanced"
            )
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad unicode escapes
            raise ProtocolError(f"unparsable version JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ProtocolError("version JSON is not an object")
        if "capabilities" not in doc:
            return None
        return cls.from_dict(doc["capabilities"])


_MODELLED = frozenset(
    {
        "max_msg_fds",
        "max_data_xfer_size",
        "max_dma_maps",
        "pgsizes",
        "twin_socket",
        "write_multiple",
    }
)


def _check_bounds(name: str, value: int) -> None:
    bounds = CAPABILITY_BOUNDS[name]
    if not bounds.low <= value <= bounds.high:
        raise ProtocolError(
            f"{name} {value} is out of range (accepted: {bounds.low} to {bounds.high})"
        )
    if bounds.power_of_two and value & (value - 1):
        raise ProtocolError(f"{name} {value} is not a power of two")


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python; JSON true is not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _int_entry(caps: Mapping[str, object], name: str, default: int) -> int:
    value = caps.get(name, default)
    if not _is_int(value):
        raise ProtocolError(f"{name} is not an integer")
    assert isinstance(value, int)
    _check_bounds(name, value)
    return value


def _twin_entry(value: object) -> TwinSocket:
    if not isinstance(value, dict):
        raise ProtocolError("twin_socket is not a JSON object")
    supported = value.get("supported", False)
    if not isinstance(supported, bool):
        raise ProtocolError("twin_socket.supported is not a boolean")
    fd_index = value.get("fd_index")
    if fd_index is not None:
        if not _is_int(fd_index):
            raise ProtocolError("twin_socket.fd_index is not an integer")
        assert isinstance(fd_index, int)
        _check_bounds("twin_socket.fd_index", fd_index)
    return TwinSocket(supported, fd_index)


def _check_migration(value: object) -> None:
    """The legacy ``migration`` object (kept in ``extra``): its known members must be sane."""
    if not isinstance(value, dict):
        raise ProtocolError("migration is not a JSON object")
    for member in ("pgsize", "max_bitmap_size"):
        if member in value:
            entry = value[member]
            if not _is_int(entry):
                raise ProtocolError(f"migration.{member} is not an integer")
            assert isinstance(entry, int)
            _check_bounds(f"migration.{member}", entry)


# Nesting is measured without a parser (which is what could recurse): drop the string
# literals (an unterminated one takes the rest of the text), keep only the brackets as
# "(" and ")", then peel the innermost pairs, exactly one level per pass. Whether "[" is
# closed by "]" or "}" does not matter here: the parser refuses a mismatch, and how deep
# it can recurse first is bounded all the same. Every step is a linear pass in C.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|".*', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_AS_PARENS = str.maketrans("[{]}", "(())")


def _within_depth(text: str, limit: int) -> bool:
    """True if ``text``'s arrays/objects nest at most ``limit`` deep and their brackets balance."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text)).translate(_AS_PARENS)
    for _ in range(limit):
        if not brackets:
            return True
        brackets = brackets.replace("()", "")
    return not brackets
