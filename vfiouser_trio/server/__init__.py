"""The device side: write a PCI device as an async class and serve it to vfio-user clients.

Everything a device author imports is here: the classes, the constants of the protocol a
device names (``PciIrq``, ``PciRegion``, ``MigState``, the ``IRQ_INFO_*`` flags it may pass
to ``add_irq``) and the errors it raises or meets.
"""

from ..limits import DEFAULT_LIMITS, ServerLimits
from ..protocol.constants import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    MigState,
    PciIrq,
    PciRegion,
)
from ..protocol.errors import VfioUserError
from .device import MAX_IRQ_INDEX, MAX_REGION_INDEX, Device
from .device_errors import DeviceCodeError
from .dma import DmaError, DmaSegment, DmaTable, DmaWindow
from .doorbells import Doorbell
from .irqs import IrqIndex
from .migration import MigrationRefused
from .pci import BarSpec, ConfigRegisters, InterruptPin, PciConfigSpace, PciIdentity
from .pci_caps import (
    ExpressCapability,
    MsiCapability,
    MsixCapability,
    PowerManagementCapability,
    SerialNumberCapability,
    VendorCallbackCapability,
    VendorCapability,
    VendorExtendedCapability,
)
from .regions import MemoryRegion, Region, RegionMemory, RegionType, SparseArea
from .serve import DeviceServer, serve, serve_connection
from .session import DEFAULT_SERVER_CAPABILITIES, ServerSession

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_SERVER_CAPABILITIES",
    "IRQ_INFO_AUTOMASKED",
    "IRQ_INFO_EVENTFD",
    "IRQ_INFO_MASKABLE",
    "IRQ_INFO_NORESIZE",
    "MAX_IRQ_INDEX",
    "MAX_REGION_INDEX",
    "BarSpec",
    "ConfigRegisters",
    "Device",
    "DeviceCodeError",
    "DeviceServer",
    "DmaError",
    "DmaSegment",
    "DmaTable",
    "DmaWindow",
    "Doorbell",
    "ExpressCapability",
    "InterruptPin",
    "IrqIndex",
    "MemoryRegion",
    "MigState",
    "MigrationRefused",
    "MsiCapability",
    "MsixCapability",
    "PciConfigSpace",
    "PciIdentity",
    "PciIrq",
    "PciRegion",
    "PowerManagementCapability",
    "Region",
    "RegionMemory",
    "RegionType",
    "SerialNumberCapability",
    "ServerLimits",
    "ServerSession",
    "SparseArea",
    "VendorCallbackCapability",
    "VendorCapability",
    "VendorExtendedCapability",
    "VfioUserError",
    "serve",
    "serve_connection",
]
