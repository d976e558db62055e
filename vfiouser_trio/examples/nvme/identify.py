"""The Identify data structures (NVMe 1.4, section 5.15.2), 4096 bytes each."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .keepalive import KAS
from .spec import CQES_LOG2, NAMESPACE_ATTRIBUTE_NOTICES, SQES_LOG2, VERSION_1_4

IDENTIFY_SIZE = 4096
NSID = 1  # the one namespace
#: ONCS bits: Dataset Management (2) and Write Zeroes (3).
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
#: OACS bit 8: Doorbell Buffer Config (shadow doorbells).
OACS_DBBUF = 1 << 8
#: Asynchronous Event Request Limit, 0-based: four outstanding AERs.
AERL = 3
#: Abort Command Limit, 0-based.
ACL = 3


@dataclass(frozen=True)
class ControllerInfo:
    """What Identify Controller reports; ``serial`` also seeds the namespace's IDs."""

    serial: str
    model: str = "vfiouser_trio NVMe example"
    firmware: str = "1.0"
    vendor_id: int = 0x1234
    mdts: int = 5  # maximum transfer 2**5 pages
    volatile_write_cache: bool = True


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


def identify_controller(info: ControllerInfo, io_queues: int) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", data, 0, info.vendor_id, info.vendor_id)  # VID, SSVID
    data[4:24] = _ascii(info.serial, 20)
    data[24:64] = _ascii(info.model, 40)
    data[64:72] = _ascii(info.firmware, 8)
    data[72] = 6  # RAB
    data[77] = info.mdts
    struct.pack_into("<HI", data, 78, 1, VERSION_1_4)  # CNTLID, VER
    struct.pack_into("<I", data, 92, NAMESPACE_ATTRIBUTE_NOTICES)  # OAES
    data[111] = 1  # CNTRLTYPE: I/O controller
    struct.pack_into("<H", data, 256, OACS_DBBUF)  # OACS
    data[258] = ACL
    data[259] = AERL
    data[260] = 1 << 1  # FRMW: one firmware slot, slot 1 read-only
    data[261] = 0  # LPA: no per-namespace SMART, no command effects log
    data[262] = 0  # ELPE: one error log entry
    struct.pack_into("<H", data, 320, KAS)  # Keep Alive supported, 100 ms granularity
    data[512] = SQES_LOG2 | SQES_LOG2 << 4  # SQES: required and maximum 64 bytes
    data[513] = CQES_LOG2 | CQES_LOG2 << 4  # CQES: 16 bytes
    struct.pack_into("<H", data, 514, 0)  # MAXCMD: not reported
    struct.pack_into("<I", data, 516, NSID)  # NN
    struct.pack_into("<H", data, 520, ONCS_DSM | ONCS_WRITE_ZEROES)
    data[525] = 1 if info.volatile_write_cache else 0  # VWC
    subnqn = f"nqn.2014-08.org.nvmexpress:uuid:{namespace_uuid(info)}"
    data[768 : 768 + len(subnqn)] = subnqn.encode()
    return bytes(data)


def namespace_uuid(info: ControllerInfo) -> str:
    digest = hashlib.sha256(info.serial.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def namespace_ids(info: ControllerInfo) -> tuple[bytes, bytes]:
    """(NGUID, EUI-64) of the namespace, stable for a given serial number."""
    digest = hashlib.sha256(b"ns1:" + info.serial.encode()).digest()
    return digest[:16], digest[16:24]


def identify_namespace(info: ControllerInfo, blocks: int, lba_shift: int) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", data, 0, blocks, blocks, blocks)  # NSZE, NCAP, NUSE
    data[25] = 0  # NLBAF: one format
    data[26] = 0  # FLBAS: format 0
    nguid, eui64 = namespace_ids(info)
    data[104:120] = nguid
    data[120:128] = eui64
    struct.pack_into("<I", data, 128, lba_shift << 16)  # LBAF0: MS 0, LBADS, RP 0
    return bytes(data)


def active_namespaces(after: int) -> bytes:
    """Active namespace IDs above ``after``, as Identify CNS 02h lists them."""
    data = bytearray(IDENTIFY_SIZE)
    if after < NSID:
        struct.pack_into("<I", data, 0, NSID)
    return bytes(data)


def namespace_descriptors(info: ControllerInfo) -> bytes:
    """Identify CNS 03h: the namespace's EUI-64, NGUID and UUID descriptors."""
    nguid, eui64 = namespace_ids(info)
    uuid = bytes.fromhex(namespace_uuid(info).replace("-", ""))
    body = b"".join(
        struct.pack("<BBH", kind, len(value), 0) + value
        for kind, value in ((1, eui64), (2, nguid), (3, uuid))
    )
    return body.ljust(IDENTIFY_SIZE, b"\0")
