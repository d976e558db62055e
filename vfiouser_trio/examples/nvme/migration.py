"""The controller's migration state: what travels, and its checks on arrival.

The stream (inside the framework's container, which adds identity, config space,
MSI-X and a CRC) is a u32 length, a JSON document of registers, features, held AERs and
every queue (base, size, head, tail, phase, completions not yet posted), then, for a
namespace in memory, its bytes. A file-backed namespace does not travel: the
destination serves the same file (shared storage), of the same size.

The client writes the stream, so the destination trusts nothing in it: every number is
range-checked against what this controller could have saved (`restore` raises
ValueError before anything changes).
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

from .admin import DEFAULT_FEATURES, FEATURE_MASKS
from .backing import MemoryBacking
from .identify import AERL
from .queues import CompletionQueue, SubmissionQueue

if TYPE_CHECKING:
    from .controller import NvmeController

VERSION = 1
#: The JSON part is small (a few queues); anything longer is not ours.
MAX_HEADER = 1 << 20
CHUNK = 1 << 20
LENGTH = struct.Struct("<I")

U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


def snapshot(ctrl: NvmeController) -> dict[str, Any]:
    return {
        "version": VERSION,
        "blocks": ctrl.blocks,
        "memory": isinstance(ctrl.backing, MemoryBacking),
        "registers": [ctrl.cc, ctrl.csts, ctrl.aqa, ctrl.asq, ctrl.acq, ctrl.intms],
        "allocated": [ctrl.io_sqs_allocated, ctrl.io_cqs_allocated],
        "features": {str(fid): value for fid, value in ctrl.features.items()},
        "async_events": list(ctrl.async_events),
        "intx_held": ctrl.intx_held,
        "msi_held": ctrl.msi_held,
        "error_events_masked": ctrl.error_events_masked,
        "smart_events": [ctrl.smart.pending, ctrl.smart.masked],
        "notice_events": [ctrl.notice.pending, ctrl.notice.masked],
        "stats": [
            ctrl.stats.bytes_read,
            ctrl.stats.bytes_written,
            ctrl.stats.reads,
            ctrl.stats.writes,
        ],
        "cqs": [
            [
                cq.qid,
                cq.base,
                cq.size,
                cq.vector,
                cq.interrupts,
                cq.head,
                cq.tail,
                cq.phase,
                [list(p) for p in cq.pending],
            ]
            for cq in ctrl.cqs.values()
        ],
        "shadow": list(ctrl.shadow) if ctrl.shadow is not None else None,
        "sqs": [
            [sq.qid, sq.base, sq.size, sq.cq.qid, sq.head, sq.tail] for sq in ctrl.sqs.values()
        ],
    }


async def save_chunks(ctrl: NvmeController) -> AsyncIterator[bytes]:
    header = json.dumps(snapshot(ctrl), separators=(",", ":")).encode()
    yield LENGTH.pack(len(header)) + header
    if isinstance(ctrl.backing, MemoryBacking):
        for offset in range(0, ctrl.backing.size, CHUNK):
            yield await ctrl.backing.read(offset, min(CHUNK, ctrl.backing.size - offset))


def _refuse(what: str) -> NoReturn:
    raise ValueError(f"NVMe state: {what}")


def _int(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"NVMe state: {what} {value!r} is not in {low}..{high}")
    return value


def _list(value: object, length: int | None, what: str) -> list[Any]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise ValueError(f"NVMe state: {what} is not a list of {length or 'some'} items")
    return value


def _flags(value: object, what: str) -> tuple[bool, bool]:
    pending, masked = _list(value, 2, what)
    if not isinstance(pending, bool) or not isinstance(masked, bool):
        _refuse(f"{what} are not booleans")
    return pending, masked


async def restore(ctrl: NvmeController, data: bytes) -> None:
    """Load a stream `save_chunks` produced; ValueError (and nothing changed) otherwise."""
    if len(data) < LENGTH.size:
        raise ValueError("NVMe state: shorter than its length field")
    (size,) = LENGTH.unpack_from(data)
    if size > min(MAX_HEADER, len(data) - LENGTH.size):
        raise ValueError(f"NVMe state: a {size}-byte header")
    try:
        state = json.loads(data[LENGTH.size : LENGTH.size + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"NVMe state: {error}") from None
    if not isinstance(state, dict):
        _refuse("not an object")
    contents = data[LENGTH.size + size :]
    _int(state.get("version"), VERSION, VERSION, "version")
    _int(state.get("blocks"), ctrl.blocks, ctrl.blocks, "namespace size in blocks")
    memory = isinstance(ctrl.backing, MemoryBacking)
    if state.get("memory") is not memory:
        raise ValueError("NVMe state: the namespace backing differs (memory / file)")
    if len(contents) != (ctrl.backing.size if memory else 0):
        raise ValueError(f"NVMe state: {len(contents)} bytes of namespace data")
    cc, csts, aqa, asq, acq, intms = (
        _int(v, 0, U64 if i in (3, 4) else U32, "a register")
        for i, v in enumerate(_list(state.get("registers"), 6, "registers"))
    )
    nsq, ncq = (_int(v, 1, ctrl.max_io_queues, "queues allocated")
                for v in _list(state.get("allocated"), 2, "allocated"))  # fmt: skip
    features_in = state.get("features")
    if not isinstance(features_in, dict) or set(features_in) != {str(f) for f in DEFAULT_FEATURES}:
        raise ValueError("NVMe state: not this controller's features")
    features = {int(fid): _int(v, 0, FEATURE_MASKS[int(fid)], f"feature {fid}")
                for fid, v in features_in.items()}  # fmt: skip
    events = [_int(c, 0, U16, "an AER command ID")
              for c in _list(state.get("async_events"), None, "AERs")]  # fmt: skip
    if len(events) > AERL + 1:
        raise ValueError("NVMe state: more AERs than AERL")
    intx_held, masked = state.get("intx_held"), state.get("error_events_masked")
    if not isinstance(intx_held, bool) or not isinstance(masked, bool):
        _refuse("intx_held or error_events_masked is not a boolean")
    msi_held = _int(state.get("msi_held"), 0, (1 << ctrl.msi_vectors) - 1, "held MSI vectors")
    smart_events, notice_events = (_flags(state.get(key), key)
                                   for key in ("smart_events", "notice_events"))  # fmt: skip
    stats = [_int(v, 0, U64, "a counter") for v in _list(state.get("stats"), 4, "stats")]
    cqs: dict[int, CompletionQueue] = {}
    for item in _list(state.get("cqs"), None, "CQs"):
        qid, base, entries, vector, interrupts, head, tail, phase, pending = _list(item, 9, "a CQ")
        qid = _int(qid, 0, ctrl.max_io_queues, "a CQ ID")
        entries = _int(entries, 2, ctrl.max_queue_entries, "a CQ size")
        if qid in cqs or not isinstance(interrupts, bool):
            raise ValueError(f"NVMe state: CQ {qid}")
        cq = CompletionQueue(qid, _int(base, 0, U64, "a CQ base"), entries,
                             _int(vector, 0, ctrl.interrupt_vectors - 1, "a vector"), interrupts,
                             _int(head, 0, entries - 1, "a CQ head"),
                             _int(tail, 0, entries - 1, "a CQ tail"),
                             _int(phase, 0, 1, "a phase"))  # fmt: skip
        for completion in _list(pending, None, "pending completions"):
            result, sq_head, sqid, cid, status = _list(completion, 5, "a completion")
            cq.pending.append((_int(result, 0, U32, "a result"), _int(sq_head, 0, U16, "SQ head"),
                               _int(sqid, 0, U16, "an SQ ID"), _int(cid, 0, U16, "a command ID"),
                               _int(status, 0, (1 << 15) - 1, "a status")))  # fmt: skip
        if len(cq.pending) > entries:
            raise ValueError(f"NVMe state: CQ {qid} has more completions waiting than entries")
        cqs[qid] = cq
    sqs: dict[int, SubmissionQueue] = {}
    for item in _list(state.get("sqs"), None, "SQs"):
        qid, base, entries, cqid, head, tail = _list(item, 6, "an SQ")
        qid = _int(qid, 0, ctrl.max_io_queues, "an SQ ID")
        entries = _int(entries, 2, ctrl.max_queue_entries, "an SQ size")
        cq_of = cqs.get(_int(cqid, 0, ctrl.max_io_queues, "a CQ ID"))
        if qid in sqs or cq_of is None or (qid == 0) != (cqid == 0):
            raise ValueError(f"NVMe state: SQ {qid} on CQ {cqid}")
        sqs[qid] = SubmissionQueue(qid, _int(base, 0, U64, "an SQ base"), entries, cq_of,
                                   _int(head, 0, entries - 1, "an SQ head"),
                                   _int(tail, 0, entries - 1, "an SQ tail"))  # fmt: skip
    shadow_in = state.get("shadow")
    shadow = None
    if shadow_in is not None:
        dbs, eis = (_int(v, 1, U64, "a doorbell buffer") for v in _list(shadow_in, 2, "shadow"))
        if dbs % ctrl.page_size or eis % ctrl.page_size:
            _refuse("doorbell buffers off a page")
        shadow = (dbs, eis)
    # Everything checked: replace the controller's state.
    ctrl.restore_state(
        registers=(cc, csts, aqa, asq, acq, intms), allocated=(nsq, ncq), features=features,
        async_events=events, intx_held=intx_held, stats=stats, cqs=cqs, sqs=sqs,
        shadow=shadow, error_events_masked=masked, msi_held=msi_held,
        smart_events=smart_events, notice_events=notice_events,
    )  # fmt: skip
    if memory:
        await ctrl.backing.write(0, contents)
