"""The vfio-user client: drive any vfio-user server (device) from trio code.

``async with connect(path) as device: data = await device.read(PciRegion.BAR0, 0, 4)``
"""

from ..engine import ConnectionClosedError
from ..protocol.errors import ProtocolError, VfioUserError
from .client import (
    DEFAULT_CAPABILITIES,
    DEFAULT_CLIENT_LIMITS,
    DEFAULT_NEGOTIATION_TIMEOUT,
    Client,
    ClientLimits,
    NegotiationTimeout,
    connect,
)
from .config import PciBar, PciCapabilityInfo, PciConfig, PciHeader
from .dirty import DirtyLogging, DirtyPages
from .dma import DmaMap
from .guest_memory import GuestMemory
from .irqs import Interrupt
from .migrate import (
    MigrationError,
    MigrationProgress,
    MigrationStep,
    MigrationSummary,
    Phase,
    PhaseStats,
    migrate,
)
from .regions import MappedArea, Region, RegionIoFd

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_CLIENT_LIMITS",
    "DEFAULT_NEGOTIATION_TIMEOUT",
    "Client",
    "ClientLimits",
    "ConnectionClosedError",
    "DirtyLogging",
    "DirtyPages",
    "DmaMap",
    "GuestMemory",
    "Interrupt",
    "MappedArea",
    "MigrationError",
    "MigrationProgress",
    "MigrationStep",
    "MigrationSummary",
    "NegotiationTimeout",
    "PciBar",
    "PciCapabilityInfo",
    "PciConfig",
    "PciHeader",
    "Phase",
    "PhaseStats",
    "ProtocolError",
    "Region",
    "RegionIoFd",
    "VfioUserError",
    "connect",
    "migrate",
]
