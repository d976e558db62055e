"""NVMe 1.4 numbers the controller uses: registers, opcodes, status codes, structures.

Names follow the NVM Express Base Specification 1.4 (sections 3.1 "Register
Definition", 4.6 "Completion Queue Entry", 5 "Admin Command Set", 6 "NVM Command Set").
"""

from __future__ import annotations

import struct
from enum import IntEnum

# --- BAR0 registers (section 3.1) --------------------------------------------------------
CAP = 0x00  # 64 bits
VS = 0x08
INTMS = 0x0C
INTMC = 0x10
CC = 0x14
CSTS = 0x1C
NSSR = 0x20
AQA = 0x24
ASQ = 0x28  # 64 bits
ACQ = 0x30  # 64 bits
DOORBELLS = 0x1000  # SQ y tail at 0x1000 + 8y, CQ y head at 0x1000 + 8y + 4 (DSTRD 0)

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT = 16
CC_IOCQES_SHIFT = 20

CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2

VERSION_1_4 = 0x0001_0400

# --- queue entries -----------------------------------------------------------------------
SQE_SIZE = 64  # IOSQES 6
CQE_SIZE = 16  # IOCQES 4
SQES_LOG2, CQES_LOG2 = 6, 4
#: A submission queue entry: CDW0, NSID, CDW2-3, MPTR, PRP1, PRP2, CDW10-15.
SQE = struct.Struct("<IIQQQQ6I")
#: A completion queue entry: DW0 result, DW1, SQ head, SQ id, command id, phase and status.
CQE = struct.Struct("<IIHHHH")


class AdminOpcode(IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    KEEP_ALIVE = 0x18
    DOORBELL_BUFFER_CONFIG = 0x7C


class IoOpcode(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class Cns(IntEnum):
    """Identify's Controller or Namespace Structure (CDW10 bits 7:0)."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    NAMESPACE_DESCRIPTORS = 0x03


class Feature(IntEnum):
    TEMPERATURE_THRESHOLD = 0x04
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIGURATION = 0x09
    ASYNC_EVENT_CONFIGURATION = 0x0B
    KEEP_ALIVE_TIMER = 0x0F


class LogPage(IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACES = 0x04


# --- asynchronous events (section 5.2): DW0 of an AER's completion ---------------------
AER_ERROR = 0  # event type Error
AER_SMART = 1  # event type SMART / Health Status
AER_NOTICE = 2  # event type Notice
AEI_INVALID_DOORBELL = 0x01  # Error: Invalid Doorbell Register
AEI_INVALID_VALUE = 0x02  # Error: Invalid Doorbell Write Value
AEI_TEMPERATURE = 0x01  # SMART / Health: Temperature Threshold
AEI_NAMESPACE_CHANGED = 0x00  # Notice: Namespace Attribute Changed
#: Async Event Configuration bit 8 (and OAES bit 8): Namespace Attribute Notices.
NAMESPACE_ATTRIBUTE_NOTICES = 1 << 8
#: SMART log Critical Warning bit 1, and Async Event Configuration bit 1 enabling its event.
CRITICAL_TEMPERATURE = 1 << 1


def async_event(kind: int, info: int, log_page: int) -> int:
    """An AER completion's DW0: event type, event information, the log page to read."""
    return kind | info << 8 | log_page << 16


# --- status (section 4.6.1): SC in bits 7:0, SCT in bits 10:8, DNR bit 14 ----------------
SCT_GENERIC = 0
SCT_COMMAND_SPECIFIC = 1
DNR = 1 << 14


def status(sct: int, sc: int, *, dnr: bool = True) -> int:
    """A completion's 15-bit status field."""
    return (sct << 8) | sc | (DNR if dnr else 0)


SUCCESS = 0
INVALID_OPCODE = status(SCT_GENERIC, 0x01)
INVALID_FIELD = status(SCT_GENERIC, 0x02)
DATA_TRANSFER_ERROR = status(SCT_GENERIC, 0x04)
INTERNAL_ERROR = status(SCT_GENERIC, 0x06)
ABORTED_SQ_DELETION = status(SCT_GENERIC, 0x08, dnr=False)
INVALID_NAMESPACE = status(SCT_GENERIC, 0x0B)
INVALID_PRP_OFFSET = status(SCT_GENERIC, 0x13)
LBA_OUT_OF_RANGE = status(SCT_GENERIC, 0x80)
COMPLETION_QUEUE_INVALID = status(SCT_COMMAND_SPECIFIC, 0x00)
INVALID_QUEUE_IDENTIFIER = status(SCT_COMMAND_SPECIFIC, 0x01)
INVALID_QUEUE_SIZE = status(SCT_COMMAND_SPECIFIC, 0x02)
ASYNC_EVENT_LIMIT_EXCEEDED = status(SCT_COMMAND_SPECIFIC, 0x05)
INVALID_INTERRUPT_VECTOR = status(SCT_COMMAND_SPECIFIC, 0x08)
INVALID_LOG_PAGE = status(SCT_COMMAND_SPECIFIC, 0x09)
INVALID_QUEUE_DELETION = status(SCT_COMMAND_SPECIFIC, 0x0C)
FEATURE_NOT_SAVEABLE = status(SCT_COMMAND_SPECIFIC, 0x0D)


class NvmeError(Exception):
    """A command fails with ``status`` (a completion status field, see `status`)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
