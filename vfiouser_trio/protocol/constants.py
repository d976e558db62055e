"""Numeric constants of the vfio-user protocol (spec: Protocol Specification)."""

from __future__ import annotations

import enum


class Command(enum.IntEnum):
    """Command numbers carried in the header's ``command`` field."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


#: Commands the server sends to the client; every other command goes client -> server.
SERVER_TO_CLIENT_COMMANDS = frozenset({Command.DMA_READ, Command.DMA_WRITE})

HEADER_SIZE = 16

# Header flags (spec: Header).
FLAG_TYPE_MASK = 0x0F
FLAG_TYPE_COMMAND = 0x0
FLAG_TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
FLAGS_KNOWN = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR

# Version and capability defaults (spec: VFIO_USER_VERSION).
VERSION_MAJOR = 0
#: Minor 2 adds twin sockets; it is what libvfio-user speaks today.
VERSION_MINOR = 2
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
#: Upper bound accepted for max_msg_fds in a peer's capabilities: a sanity bound far above
#: any deployed peer's value (libvfio-user and QEMU propose a handful).
MAX_MSG_FDS_LIMIT = 1024

# DMA_MAP / DMA_UNMAP flags.
DMA_MAP_FLAG_READ = 1 << 0
DMA_MAP_FLAG_WRITE = 1 << 1
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1

# DEVICE_GET_INFO flags.
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

# DEVICE_GET_REGION_INFO flags and region capabilities (linux/vfio.h).
REGION_INFO_FLAG_READ = 1 << 0
REGION_INFO_FLAG_WRITE = 1 << 1
REGION_INFO_FLAG_MMAP = 1 << 2
REGION_INFO_FLAG_CAPS = 1 << 3
REGION_INFO_CAP_SPARSE_MMAP = 1
REGION_INFO_CAP_TYPE = 2


class PciRegion(enum.IntEnum):
    """Fixed region indexes of a vfio PCI device (VFIO_PCI_*_REGION_INDEX)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


#: Number of fixed PCI regions; device-specific regions follow this index.
PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    """IRQ indexes of a vfio PCI device (VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5

# DEVICE_GET_IRQ_INFO flags.
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

# DEVICE_SET_IRQS flags.
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_DATA_TYPE_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_TYPE_MASK = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# DEVICE_GET_REGION_IO_FDS sub-region types and flags.
IO_FD_TYPE_IOEVENTFD = 0
IO_FD_TYPE_IOREGIONFD = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 2

# DEVICE_FEATURE flags and feature indexes.
DEVICE_FEATURE_MASK = 0xFFFF
DEVICE_FEATURE_GET = 1 << 16
DEVICE_FEATURE_SET = 1 << 17
DEVICE_FEATURE_PROBE = 1 << 18


class Feature(enum.IntEnum):
    """Feature indexes usable with DEVICE_FEATURE."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


# VFIO_DEVICE_FEATURE_MIGRATION flags.
MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2


class MigState(enum.IntEnum):
    """vfio_device_mig_state values."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7
