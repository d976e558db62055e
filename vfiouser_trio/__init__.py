"""vfiouser_trio: the vfio-user protocol for Python, on trio.

Write a PCI device as an async class and serve it (``Device``, ``serve``); drive
any vfio-user server (``connect``, ``GuestMemory``); prototype protocol changes on
the engine (``open_connection``, ordering policies).
"""

from .client import Client, GuestMemory, connect
from .engine import Connection, ConnectionClosedError, ConnectionHooks, RawMessage, open_connection
from .ordering import ConcurrentOrder, KeyedOrder, OrderingPolicy, SpecOrder
from .protocol.constants import MigState, PciIrq, PciRegion
from .protocol.errors import ProtocolError, VfioUserError
from .server import (
    Device,
    MigrationRefused,
    PciIdentity,
    ServerLimits,
    SparseArea,
    serve,
    serve_connection,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ConcurrentOrder",
    "Connection",
    "ConnectionClosedError",
    "ConnectionHooks",
    "Device",
    "GuestMemory",
    "KeyedOrder",
    "MigState",
    "MigrationRefused",
    "OrderingPolicy",
    "PciIdentity",
    "PciIrq",
    "PciRegion",
    "ProtocolError",
    "RawMessage",
    "ServerLimits",
    "SparseArea",
    "SpecOrder",
    "VfioUserError",
    "connect",
    "open_connection",
    "serve",
    "serve_connection",
]
