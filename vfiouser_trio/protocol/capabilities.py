"""Capabilities exchanged in VFIO_USER_VERSION (spec: Version, "Capabilities").

``Capabilities`` describes one side: what it can *receive* (max_msg_fds,
max_data_xfer_size) and what it supports. The same class serves the client's
proposal and the server's reply. Unknown or legacy entries (libvfio-user's and
QEMU's ``"migration": {"pgsize": 4096}``) are kept verbatim in ``extra`` and are
never a reason to reject a peer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from .constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
    MAX_MSG_FDS_LIMIT,
)
from .errors import ProtocolError

_U64_MAX = (1 << 64) - 1


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

    @classmethod
    def from_dict(cls, caps: object) -> Capabilities:
        """Validate and decode a ``capabilities`` object; ProtocolError (EINVAL) if malformed."""
        if not isinstance(caps, dict):
            raise ProtocolError("capabilities is not a JSON object")
        max_msg_fds = _int_entry(caps, "max_msg_fds", DEFAULT_MAX_MSG_FDS)
        if max_msg_fds > MAX_MSG_FDS_LIMIT:
            raise ProtocolError(f"max_msg_fds {max_msg_fds} exceeds {MAX_MSG_FDS_LIMIT}")
        twin: TwinSocket | None = None
        if "twin_socket" in caps:
            twin = _twin_entry(caps["twin_socket"])
        write_multiple = caps.get("write_multiple", False)
        if not isinstance(write_multiple, bool):
            raise ProtocolError("write_multiple is not a boolean")
        extra = tuple(
            (str(k), json.dumps(v, separators=(",", ":")))
            for k, v in caps.items()
            if k not in _MODELLED
        )
        return cls(
            max_msg_fds=max_msg_fds,
            max_data_xfer_size=_int_entry(caps, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE),
            max_dma_maps=_int_entry(caps, "max_dma_maps", DEFAULT_MAX_DMA_MAPS),
            pgsizes=_int_entry(caps, "pgsizes", DEFAULT_PGSIZES),
            twin_socket=twin,
            write_multiple=write_multiple,
            extra=extra,
        )

    @classmethod
    def from_json(cls, text: str) -> Capabilities | None:
        """Decode a version-data document; None when it has no ``capabilities``.

        Raises ProtocolError (EINVAL) for unparsable JSON, a top level that is
        not an object, or a malformed ``capabilities`` entry.
        """
        try:
            doc = json.loads(text)
        except ValueError as exc:  # JSONDecodeError and bad unicode escapes
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


def _int_entry(caps: Mapping[str, object], name: str, default: int) -> int:
    value = caps.get(name, default)
    # bool is an int subclass in Python; JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} is not an integer")
    if not 0 <= value <= _U64_MAX:
        raise ProtocolError(f"{name} {value} is out of range")
    return value


def _twin_entry(value: object) -> TwinSocket:
    if not isinstance(value, dict):
        raise ProtocolError("twin_socket is not a JSON object")
    supported = value.get("supported", False)
    if not isinstance(supported, bool):
        raise ProtocolError("twin_socket.supported is not a boolean")
    fd_index = value.get("fd_index")
    if fd_index is not None and (
        not isinstance(fd_index, int) or isinstance(fd_index, bool) or fd_index < 0
    ):
        raise ProtocolError("twin_socket.fd_index is not a non-negative integer")
    return TwinSocket(supported, fd_index)
