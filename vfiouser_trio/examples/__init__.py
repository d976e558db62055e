"""Example devices, each a zero-argument Device class usable from the CLI
(``vfiouser_trio.examples.gpio:GpioDevice``) or by name from `EXAMPLES`."""

from __future__ import annotations

from collections.abc import Callable

from ..server.device import Device
from .dmaengine import DmaEngine
from .gpio import GpioDevice
from .null import NullDevice
from .nvme import NvmeController
from .vendorcap import VendorCapDevice

__all__ = ["EXAMPLES", "DmaEngine", "GpioDevice", "NullDevice", "NvmeController", "VendorCapDevice"]

#: Example name -> zero-argument factory of a fresh device.
EXAMPLES: dict[str, Callable[[], Device]] = {
    "gpio": GpioDevice,
    "null": NullDevice,
    "dmaengine": DmaEngine,
    "nvme": NvmeController,
    "vendorcap": VendorCapDevice,
}
