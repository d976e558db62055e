"""Testing tools: nested devices, a message tracer, fault injection and pytest fixtures.

See docs/testing.md; the conformance checker is :mod:`vfiouser_trio.testing.conformance`
(docs/conformance.md; ``assert_conforms`` and ``served`` are re-exported here). The pytest
fixtures live in :mod:`vfiouser_trio.testing.fixtures` (registered by the plugin
:mod:`vfiouser_trio.testing.plugin`); importing this package does not import pytest.
"""

from ..server.device_errors import DeviceCodeError
from .comparison import Comparison, Latencies, PolicyResult, compare
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
from .order_check import OrderViolation, assert_spec_order, check_order
from .tracer import ErrorReply, ProcessingRecord, Tracer, TraceRecord
from .wait_for import WaitForGraph, wait_for_graph

__all__ = [
    "Comparison",
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
    "Latencies",
    "NestedDevice",
    "NestedDeviceFactory",
    "OrderViolation",
    "OrderedDelay",
    "PolicyResult",
    "ProcessingRecord",
    "Reorder",
    "TraceRecord",
    "Tracer",
    "WaitForGraph",
    "assert_conforms",
    "assert_spec_order",
    "chain",
    "check_order",
    "compare",
    "fd_table",
    "nested_device",
    "served",
    "set_header",
    "set_payload",
    "wait_for_graph",
]
