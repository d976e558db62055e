"""Testing tools: nested devices, a message tracer, fault injection and pytest fixtures.

See docs/testing.md; the conformance checker is :mod:`vfiouser_trio.testing.conformance`
(docs/conformance.md; ``assert_conforms`` and ``served`` are re-exported here). The pytest
fixtures live in :mod:`vfiouser_trio.testing.fixtures` (registered by the plugin
:mod:`vfiouser_trio.testing.plugin`); importing this package does not import pytest.
"""

from ..server.device_errors import DeviceCodeError
from .conformance import assert_conforms, served
from .faults import (
    Corrupt,
    Delay,
    Disconnect,
    Drop,
    Fault,
    OrderedDelay,
    Reorder,
    set_header,
    set_payload,
)
from .hooks import Direction, HookChain, chain
from .nested import FdLeakError, NestedDevice, NestedDeviceFactory, fd_table, nested_device
from .tracer import ErrorReply, Tracer, TraceRecord

__all__ = [
    "Corrupt",
    "Delay",
    "DeviceCodeError",
    "Direction",
    "Disconnect",
    "Drop",
    "ErrorReply",
    "Fault",
    "FdLeakError",
    "HookChain",
    "NestedDevice",
    "NestedDeviceFactory",
    "OrderedDelay",
    "Reorder",
    "TraceRecord",
    "Tracer",
    "assert_conforms",
    "chain",
    "fd_table",
    "nested_device",
    "served",
    "set_header",
    "set_payload",
]
