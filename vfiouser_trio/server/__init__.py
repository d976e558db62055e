"""The device side: write a PCI device as an async class and serve it to vfio-user clients."""

from ..limits import DEFAULT_LIMITS, ServerLimits
from .device import Device
from .dma import DmaError, DmaTable
from .doorbells import Doorbell
from .irqs import IrqIndex
from .pci import BarSpec, InterruptPin, PciConfigSpace, PciIdentity
from .pci_caps import (
    ExpressCapability,
    MsiCapability,
    MsixCapability,
    PowerManagementCapability,
    SerialNumberCapability,
    VendorCapability,
    VendorExtendedCapability,
)
from .regions import Region, RegionType, SparseArea
from .serve import DeviceServer, serve, serve_connection
from .session import DEFAULT_SERVER_CAPABILITIES, ServerSession

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_SERVER_CAPABILITIES",
    "BarSpec",
    "Device",
    "DeviceServer",
    "DmaError",
    "DmaTable",
    "Doorbell",
    "ExpressCapability",
    "InterruptPin",
    "IrqIndex",
    "MsiCapability",
    "MsixCapability",
    "PciConfigSpace",
    "PciIdentity",
    "PowerManagementCapability",
    "Region",
    "RegionType",
    "SerialNumberCapability",
    "ServerLimits",
    "ServerSession",
    "SparseArea",
    "VendorCapability",
    "VendorExtendedCapability",
    "serve",
    "serve_connection",
]
