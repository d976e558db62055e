"""The bounds a server puts on what one client can make it hold or do.

Every limit that protects the process from a client lives here, with its default;
``serve(..., limits=ServerLimits(...))`` changes them. The limits a client is told
about in VERSION (``max_dma_maps``, ``max_data_xfer_size``, ``max_msg_fds``) are
capabilities instead: ``serve(..., capabilities=...)``. docs/security.md explains
what each one defends against.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import DEFAULT_DISPATCH_BATCH
from .protocol.dma import DmaLayout

__all__ = ["DEFAULT_LIMITS", "ServerLimits"]


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-connection (and per-listener) bounds a server enforces against its clients."""

    #: Bytes one client's connection may hold for it: commands received and not yet done
    #: plus replies and server->client messages its socket has not taken. At this mark the
    #: connection stops reading that client until the load halves (it overshoots by at
    #: most one read and one reply). A link awaiting a reply to one of our own requests
    #: never pauses (the reply may be behind); at twice the mark it is closed (ENOBUFS).
    max_send_backlog: int = 4 << 20
    #: Commands one connection's dispatcher runs back to back before it yields to the
    #: rest of the process, so one pipelining client cannot starve other devices.
    dispatch_batch: int = DEFAULT_DISPATCH_BATCH
    #: Bytes of dirty-page bitmap one client's DMA logging may hold at once (bitmaps are
    #: allocated lazily, 4 KiB per chunk of 32768 pages written; a DMA map whose bitmap
    #: would pass this is reported all dirty until unmapped or logging stops).
    max_dirty_bitmap_bytes: int = 64 << 20
    #: IOVA ranges one DMA_LOGGING_START may name (more: E2BIG, as Linux's VFIO does
    #: past one page of ranges); bounds the per-write range lookup and the log's memory.
    max_dirty_ranges: int = 256
    #: Calls of a device's async ``irq_state_changed`` hook that may wait while it runs
    #: behind the client's masking (each mask/unmask is one); beyond this they are dropped,
    #: counted (``IrqTable.state_calls_dropped``) and logged, so a client masking in a loop
    #: cannot make the server queue without bound. Plain hooks run at once and never wait.
    max_irq_state_backlog: int = 4096
    #: Seconds a refused (busy) client has to send its first command before we hang up;
    #: a refused client that hangs up earlier is released at once.
    busy_answer_timeout: float = 10.0
    #: Seconds a client that connects while the previous client of the same device has
    #: hung up but its session is still being torn down waits for that teardown; past
    #: this it is refused with EBUSY. (A client arriving while another is attached and
    #: has not hung up is refused at once.)
    detach_wait: float = 10.0
    #: Seconds a client may leave one of our DMA_READ / DMA_WRITE messages unanswered (up to
    #: a quarter more: the reply clock checks four times per timeout); then the connection
    #: closes (``ReplyTimeout``, ETIMEDOUT), failing the device's pending DMA, as if the
    #: client had hung up. None: wait for ever (the device's own ``trio.fail_after`` still
    #: works, and leaves the connection up).
    reply_timeout: float | None = 30.0
    #: Seconds the listener pauses after accept() fails with EMFILE/ENFILE/ENOBUFS/ENOMEM
    #: (the process is out of fds or memory); it then tries again, logging each pause.
    accept_backoff: float = 0.1
    #: Whether device code may take zero-copy views of DMA maps whose file the client
    #: can still shrink (no F_SEAL_SHRINK and none could be added). Such a client can
    #: then crash the process with SIGBUS: turn this on only for a trusted client.
    trust_client_memory: bool = False
    #: How the client lays out DMA_READ replies and DMA_WRITE messages, for maps without an
    #: fd: ``DmaLayout.QEMU`` (QEMU's vfio-user-pci) or ``DmaLayout.SPEC``. None (default):
    #: learnt per connection, from the first DMA_READ reply only one layout fits, else by a
    #: zero-length DMA_WRITE probe (harmless in both) before the first DMA_WRITE.
    dma_layout: DmaLayout | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_send_backlog",
            "dispatch_batch",
            "max_dirty_bitmap_bytes",
            "max_dirty_ranges",
            "max_irq_state_backlog",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive int, got {value!r}")
        for name in ("busy_answer_timeout", "detach_wait", "accept_backoff"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be positive")
        if self.reply_timeout is not None and not self.reply_timeout > 0:
            raise ValueError("ServerLimits.reply_timeout must be positive (or None)")


DEFAULT_LIMITS = ServerLimits()
