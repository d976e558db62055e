"""Admin commands (NVMe 1.4, section 5): queues, Identify, features, logs, AER, Abort.

Each handler takes the controller and a decoded command and returns ``(status,
result)``; a bad field raises `NvmeError` with the status. Opcodes without a handler
complete with Invalid Opcode (`Controller.admin`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import identify as ident
from .command import HELD, Command, Handler, Outcome
from .queues import CompletionQueue, SubmissionQueue
from .spec import (
    ASYNC_EVENT_LIMIT_EXCEEDED,
    CC_IOCQES_SHIFT,
    CC_IOSQES_SHIFT,
    COMPLETION_QUEUE_INVALID,
    CQES_LOG2,
    FEATURE_NOT_SAVEABLE,
    INVALID_FIELD,
    INVALID_INTERRUPT_VECTOR,
    INVALID_LOG_PAGE,
    INVALID_NAMESPACE,
    INVALID_QUEUE_DELETION,
    INVALID_QUEUE_IDENTIFIER,
    INVALID_QUEUE_SIZE,
    SQES_LOG2,
    SUCCESS,
    AdminOpcode,
    Cns,
    Feature,
    LogPage,
    NvmeError,
)

if TYPE_CHECKING:
    from .controller import NvmeController


def _queue_geometry(ctrl: NvmeController, cmd: Command, entry_log2: int, shift: int) -> int:
    """The checks Create I/O SQ and CQ share; returns the queue's size in entries."""
    qid, size = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
    if (ctrl.cc >> shift) & 0xF != entry_log2:
        raise NvmeError(INVALID_FIELD, "CC.IOSQES/IOCQES are not the controller's entry sizes")
    if not cmd.cdw11 & 1:
        raise NvmeError(INVALID_FIELD, "queues must be physically contiguous (CAP.CQR)")
    if not 2 <= size <= ctrl.max_queue_entries:
        raise NvmeError(INVALID_QUEUE_SIZE, f"queue {qid} of {size} entries")
    if cmd.prp1 % ctrl.page_size:
        raise NvmeError(INVALID_FIELD, f"queue {qid} base {cmd.prp1:#x} is not page aligned")
    return size


async def create_io_cq(ctrl: NvmeController, cmd: Command) -> Outcome:
    qid = cmd.cdw10 & 0xFFFF
    if not 1 <= qid <= ctrl.io_cqs_allocated or qid in ctrl.cqs:
        raise NvmeError(INVALID_QUEUE_IDENTIFIER, f"completion queue {qid} cannot be created")
    size = _queue_geometry(ctrl, cmd, CQES_LOG2, CC_IOCQES_SHIFT)
    interrupts, vector = bool(cmd.cdw11 & 0x2), cmd.cdw11 >> 16
    if vector >= ctrl.interrupt_vectors:
        raise NvmeError(INVALID_INTERRUPT_VECTOR, f"vector {vector} for completion queue {qid}")
    ctrl.cqs[qid] = CompletionQueue(qid, cmd.prp1, size, vector, interrupts)
    return SUCCESS, 0


async def create_io_sq(ctrl: NvmeController, cmd: Command) -> Outcome:
    qid, cqid = cmd.cdw10 & 0xFFFF, cmd.cdw11 >> 16
    if not 1 <= qid <= ctrl.io_sqs_allocated or qid in ctrl.sqs:
        raise NvmeError(INVALID_QUEUE_IDENTIFIER, f"submission queue {qid} cannot be created")
    size = _queue_geometry(ctrl, cmd, SQES_LOG2, CC_IOSQES_SHIFT)
    cq = ctrl.cqs.get(cqid)
    if cqid == 0 or cq is None:
        raise NvmeError(COMPLETION_QUEUE_INVALID, f"submission queue {qid} names CQ {cqid}")
    ctrl.start_queue(SubmissionQueue(qid, cmd.prp1, size, cq))
    return SUCCESS, 0


async def delete_io_sq(ctrl: NvmeController, cmd: Command) -> Outcome:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in ctrl.sqs:
        raise NvmeError(INVALID_QUEUE_IDENTIFIER, f"no submission queue {qid} to delete")
    ctrl.stop_queue(ctrl.sqs[qid])
    return SUCCESS, 0


async def delete_io_cq(ctrl: NvmeController, cmd: Command) -> Outcome:
    qid = cmd.cdw10 & 0xFFFF
    cq = ctrl.cqs.get(qid)
    if qid == 0 or cq is None:
        raise NvmeError(INVALID_QUEUE_IDENTIFIER, f"no completion queue {qid} to delete")
    if cq.sqs:
        raise NvmeError(INVALID_QUEUE_DELETION, f"completion queue {qid} still has SQs")
    del ctrl.cqs[qid]
    return SUCCESS, 0


async def identify(ctrl: NvmeController, cmd: Command) -> Outcome:
    cns, nsid = cmd.cdw10 & 0xFF, cmd.nsid
    if cns == Cns.CONTROLLER:
        data = ident.identify_controller(ctrl.info, ctrl.max_io_queues)
    elif cns == Cns.NAMESPACE:
        if nsid != ident.NSID:
            raise NvmeError(INVALID_NAMESPACE, f"Identify of namespace {nsid:#x}")
        data = ident.identify_namespace(ctrl.info, ctrl.blocks, ctrl.lba_shift)
    elif cns == Cns.ACTIVE_NAMESPACES:
        if nsid >= 0xFFFF_FFFE:
            raise NvmeError(INVALID_NAMESPACE, f"active namespaces above {nsid:#x}")
        data = ident.active_namespaces(nsid)
    elif cns == Cns.NAMESPACE_DESCRIPTORS:
        if nsid != ident.NSID:
            raise NvmeError(INVALID_NAMESPACE, f"descriptors of namespace {nsid:#x}")
        data = ident.namespace_descriptors(ctrl.info)
    else:
        raise NvmeError(INVALID_FIELD, f"Identify CNS {cns:#x} is not supported")
    await ctrl.to_host(cmd, data)
    return SUCCESS, 0


async def set_features(ctrl: NvmeController, cmd: Command) -> Outcome:
    fid, value = cmd.cdw10 & 0xFF, cmd.cdw11
    if cmd.cdw10 & (1 << 31):
        raise NvmeError(FEATURE_NOT_SAVEABLE, f"feature {fid:#x} cannot be saved")
    if fid == Feature.NUMBER_OF_QUEUES:
        nsqr, ncqr = value & 0xFFFF, value >> 16
        if nsqr == 0xFFFF or ncqr == 0xFFFF:
            raise NvmeError(INVALID_FIELD, "65536 queues requested")
        ctrl.io_sqs_allocated = min(nsqr + 1, ctrl.max_io_queues)
        ctrl.io_cqs_allocated = min(ncqr + 1, ctrl.max_io_queues)
        return SUCCESS, _queues_result(ctrl)
    if fid == Feature.VOLATILE_WRITE_CACHE and not ctrl.info.volatile_write_cache:
        raise NvmeError(INVALID_FIELD, "no volatile write cache")
    if fid not in ctrl.features:
        raise NvmeError(INVALID_FIELD, f"feature {fid:#x} is not supported")
    if fid == Feature.TEMPERATURE_THRESHOLD:
        return _set_temperature_threshold(ctrl, value)
    if fid == Feature.INTERRUPT_VECTOR_CONFIGURATION:
        vector = _vector(ctrl, value)
        if vector == 0:
            raise NvmeError(INVALID_FIELD, "the admin queue's vector is never coalesced")
        disabled = ctrl.features[fid] & ~(1 << vector)
        ctrl.features[fid] = disabled | (value >> 16 & 1) << vector
        return SUCCESS, 0
    ctrl.features[fid] = value & FEATURE_MASKS[fid]
    if fid == Feature.KEEP_ALIVE_TIMER:
        ctrl.keep_alive.start(ctrl.features[fid])
    return SUCCESS, 0


def _vector(ctrl: NvmeController, value: int) -> int:
    """Interrupt Vector Configuration's IV (bits 15:0), one of the controller's."""
    vector = value & 0xFFFF
    if vector >= ctrl.interrupt_vectors:
        raise NvmeError(INVALID_FIELD, f"no interrupt vector {vector}")
    return vector


def _threshold_select(value: int) -> int:
    """Temperature Threshold's THSEL (0 over, 1 under), for the composite temperature
    (TMPSEL 0, or Fh: every sensor, and the composite is the only one)."""
    tmpsel, thsel = value >> 16 & 0xF, value >> 20 & 0x3
    if tmpsel not in (0, 0xF) or thsel > 1:
        raise NvmeError(INVALID_FIELD, f"temperature threshold TMPSEL {tmpsel} THSEL {thsel}")
    return thsel


def _set_temperature_threshold(ctrl: NvmeController, value: int) -> Outcome:
    """Kept as over | under << 16 (kelvins); a warning it causes is a SMART event."""
    shift = 16 * _threshold_select(value)
    fid = Feature.TEMPERATURE_THRESHOLD
    was_warning = ctrl.temperature_warning()
    ctrl.features[fid] = ctrl.features[fid] & ~(0xFFFF << shift) | (value & 0xFFFF) << shift
    if ctrl.temperature_warning() and not was_warning:
        ctrl.smart_event()
    return SUCCESS, 0


async def get_features(ctrl: NvmeController, cmd: Command) -> Outcome:
    fid, select = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 0x7
    if select == 3:  # supported capabilities: every feature here is changeable, none saveable
        if fid != Feature.NUMBER_OF_QUEUES and fid not in ctrl.features:
            raise NvmeError(INVALID_FIELD, f"feature {fid:#x} is not supported")
        return SUCCESS, 1 << 2
    if select > 3:
        raise NvmeError(INVALID_FIELD, f"Get Features select {select}")
    if fid == Feature.NUMBER_OF_QUEUES:
        return SUCCESS, _queues_result(ctrl)
    if fid not in ctrl.features:
        raise NvmeError(INVALID_FIELD, f"feature {fid:#x} is not supported")
    value = ctrl.features[fid] if select == 0 else DEFAULT_FEATURES[fid]
    if fid == Feature.TEMPERATURE_THRESHOLD:
        thsel = _threshold_select(cmd.cdw11)
        return SUCCESS, (value >> 16 * thsel) & 0xFFFF | (cmd.cdw11 & 0x3F_0000)
    if fid == Feature.INTERRUPT_VECTOR_CONFIGURATION:
        vector = _vector(ctrl, cmd.cdw11)
        return SUCCESS, vector | (vector == 0 or bool(value >> vector & 1)) << 16
    return SUCCESS, value


def _queues_result(ctrl: NvmeController) -> int:
    return (ctrl.io_sqs_allocated - 1) | (ctrl.io_cqs_allocated - 1) << 16


#: Features the controller keeps: default and the bits a value may have. Temperature
#: Threshold is the over threshold | the under threshold << 16 (kelvins; the under one 0:
#: never), Interrupt Vector Configuration a bit per vector whose coalescing is disabled.
DEFAULT_FEATURES: dict[int, int] = {
    Feature.TEMPERATURE_THRESHOLD: 0x0157,  # 343 K over-temperature threshold
    Feature.VOLATILE_WRITE_CACHE: 1,
    Feature.INTERRUPT_COALESCING: 0,
    Feature.INTERRUPT_VECTOR_CONFIGURATION: 0,
    Feature.ASYNC_EVENT_CONFIGURATION: 0,
    Feature.KEEP_ALIVE_TIMER: 0,
}
FEATURE_MASKS: dict[int, int] = {
    Feature.TEMPERATURE_THRESHOLD: 0xFFFF_FFFF,
    Feature.VOLATILE_WRITE_CACHE: 0x1,
    Feature.INTERRUPT_COALESCING: 0xFFFF,
    Feature.INTERRUPT_VECTOR_CONFIGURATION: (1 << 65) - 1,  # vectors 0-64
    Feature.ASYNC_EVENT_CONFIGURATION: 0x3FF,
    Feature.KEEP_ALIVE_TIMER: 0xFFFF_FFFF,
}


async def get_log_page(ctrl: NvmeController, cmd: Command) -> Outcome:
    lid = cmd.cdw10 & 0xFF
    length = (((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1) * 4
    offset = cmd.cdw12 | cmd.cdw13 << 32
    if lid == LogPage.ERROR:
        log = bytes(64)  # one entry (ELPE 0), never filled: errors are in the completions
        if not cmd.cdw10 & (1 << 15):  # RAE clear: error events are reported again
            ctrl.error_events_masked = False
    elif lid == LogPage.SMART:
        log = ctrl.smart_log()
        ctrl.smart.log_read(retain=bool(cmd.cdw10 & (1 << 15)))
    elif lid == LogPage.CHANGED_NAMESPACES:
        # Namespace 1 changed since the host last read this log after a notice.
        changed = ctrl.notice.pending or ctrl.notice.masked
        log = (ident.NSID if changed else 0).to_bytes(4, "little").ljust(4096, b"\0")
        ctrl.notice.log_read(retain=bool(cmd.cdw10 & (1 << 15)))
    elif lid == LogPage.FIRMWARE_SLOT:
        slots = bytearray(512)
        slots[0] = 1  # slot 1 active
        slots[8:16] = ctrl.info.firmware.encode()[:8].ljust(8, b" ")
        log = bytes(slots)
    else:
        raise NvmeError(INVALID_LOG_PAGE, f"log page {lid:#x}")
    if offset % 4 or offset >= len(log):
        raise NvmeError(INVALID_FIELD, f"offset {offset:#x} into log page {lid:#x}")
    ctrl.check_transfer(length)
    await ctrl.to_host(cmd, log[offset : offset + length].ljust(length, b"\0"))
    ctrl.deliver_events()  # a kind unmasked by this read may have one waiting
    return SUCCESS, 0


async def async_event_request(ctrl: NvmeController, cmd: Command) -> Outcome:
    if len(ctrl.async_events) > ident.AERL:
        raise NvmeError(ASYNC_EVENT_LIMIT_EXCEEDED, "more AERs than AERL allows")
    ctrl.async_events.append(cmd.cid)  # completes with the next event, if any
    ctrl.deliver_events()  # a SMART event may be waiting for it
    return HELD


async def abort(ctrl: NvmeController, cmd: Command) -> Outcome:
    # A fetched command always runs to its end, and one not yet fetched is not looked for:
    # every Abort completes at once with "not aborted" (DW0 bit 0), as NVMe 1.4 section
    # 5.1 allows, so the Abort Command Limit (ACL) is never reached.
    return SUCCESS, 1


async def keep_alive(ctrl: NvmeController, cmd: Command) -> Outcome:
    ctrl.keep_alive.kick()
    return SUCCESS, 0


async def doorbell_buffer_config(ctrl: NvmeController, cmd: Command) -> Outcome:
    """Shadow doorbells (PRP1) and event indexes (PRP2) for the I/O queues: the host then
    writes its doorbells to memory and rings the controller only when it asks."""
    if cmd.prp1 % ctrl.page_size or cmd.prp2 % ctrl.page_size or not cmd.prp1 or not cmd.prp2:
        raise NvmeError(INVALID_FIELD, "doorbell buffers must be page aligned")
    ctrl.shadow = (cmd.prp1, cmd.prp2)
    return SUCCESS, 0


HANDLERS: dict[int, Handler] = {
    AdminOpcode.CREATE_IO_CQ: create_io_cq,
    AdminOpcode.CREATE_IO_SQ: create_io_sq,
    AdminOpcode.DELETE_IO_SQ: delete_io_sq,
    AdminOpcode.DELETE_IO_CQ: delete_io_cq,
    AdminOpcode.IDENTIFY: identify,
    AdminOpcode.SET_FEATURES: set_features,
    AdminOpcode.GET_FEATURES: get_features,
    AdminOpcode.GET_LOG_PAGE: get_log_page,
    AdminOpcode.ASYNC_EVENT_REQUEST: async_event_request,
    AdminOpcode.ABORT: abort,
    AdminOpcode.KEEP_ALIVE: keep_alive,
    AdminOpcode.DOORBELL_BUFFER_CONFIG: doorbell_buffer_config,
}
