"""memfds and shared mappings (real fds, real mappings)."""

from __future__ import annotations

import errno
import gc
import mmap
import os

import pytest

from tests.mappings import is_mapped
from vfiouser_trio.fdcheck import require_memory_fd
from vfiouser_trio.memory import (
    Mapping,
    MemFd,
    Prot,
    Seal,
    create_memfd,
    forbid_shrinking,
    page_size,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = mmap.PAGESIZE


def test_page_size() -> None:
    assert page_size() == os.sysconf("SC_PAGE_SIZE")


# --- MemFd ---------------------------------------------------------------------


def test_memfd_has_the_requested_size_and_zero_contents() -> None:
    with create_memfd("size", 3 * PAGE + 5) as memfd:
        assert memfd.size == 3 * PAGE + 5
        assert os.pread(memfd.fileno(), 3 * PAGE + 5, 0) == bytes(3 * PAGE + 5)
        memfd.resize(PAGE)
        assert os.fstat(memfd.fileno()).st_size == PAGE
        assert memfd.seals == Seal(0)  # created with MFD_ALLOW_SEALING, nothing set
        assert not os.get_inheritable(memfd.fileno())  # MFD_CLOEXEC


def test_sealed_memfd_has_a_fixed_size_but_writable_contents() -> None:
    with create_memfd("sealed", 2 * PAGE, seal=True) as memfd:
        assert memfd.seals == Seal.SHRINK | Seal.GROW | Seal.SEAL
        with pytest.raises(PermissionError):
            memfd.resize(PAGE)
        with pytest.raises(PermissionError):
            memfd.resize(4 * PAGE)
        with pytest.raises(PermissionError):
            memfd.add_seals(Seal.WRITE)
        assert os.pwrite(memfd.fileno(), b"data", PAGE) == 4
        with pytest.raises(PermissionError):
            os.pwrite(memfd.fileno(), b"grow", 2 * PAGE)  # writing past the end would grow it
        assert memfd.size == 2 * PAGE


def test_seals_can_be_added_later_unless_sealing_is_refused() -> None:
    with MemFd.create("late", PAGE) as memfd:
        memfd.add_seals(Seal.GROW)
        assert memfd.seals == Seal.GROW
        memfd.resize(PAGE // 2)  # shrinking is still allowed
        with pytest.raises(PermissionError):
            memfd.resize(PAGE)
    with MemFd.create("refused", PAGE, allow_sealing=False) as memfd:
        assert memfd.seals == Seal.SEAL
        with pytest.raises(PermissionError):
            memfd.add_seals(Seal.GROW)
    with pytest.raises(ValueError, match="allow_sealing"):
        MemFd.create("bad", PAGE, seal=True, allow_sealing=False)
    with pytest.raises(ValueError, match="negative"):
        MemFd.create("bad", -1)


def test_write_seal_is_refused_while_a_writable_mapping_exists() -> None:
    with MemFd.create("w", PAGE) as memfd:
        with memfd.map():
            with pytest.raises(OSError) as raised:
                memfd.add_seals(Seal.WRITE)
            assert raised.value.errno == errno.EBUSY
        memfd.add_seals(Seal.WRITE)
        with pytest.raises(PermissionError):
            memfd.map(prot=Prot.READ | Prot.WRITE)
        with memfd.map(prot=Prot.READ) as readonly:
            assert readonly.view[0] == 0


def test_memfd_ownership() -> None:
    memfd = create_memfd("own", PAGE)
    fd = memfd.fileno()
    memfd.close()
    memfd.close()  # idempotent
    assert memfd.closed
    with pytest.raises(ValueError, match="closed"):
        memfd.fileno()
    with pytest.raises(OSError) as raised:
        os.fstat(fd)
    assert raised.value.errno == errno.EBADF

    memfd = create_memfd("detach", PAGE)
    raw = memfd.detach()
    assert memfd.closed
    memfd.close()  # must not close the detached fd
    adopted = MemFd.from_fd(raw)
    assert adopted.size == PAGE
    del adopted  # an owned fd is closed when its MemFd goes away
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(raw)
    with pytest.raises(ValueError):
        MemFd.from_fd(-1)


# --- Mapping -------------------------------------------------------------------


def test_two_mappings_of_one_memfd_see_each_others_writes() -> None:
    with (
        create_memfd("shared", 2 * PAGE) as memfd,
        memfd.map() as first,
        Mapping(memfd.fileno(), PAGE, offset=PAGE) as second,
    ):
        assert first.address != second.address
        view1, view2 = first.view, second.view
        view1[PAGE : PAGE + 5] = b"hello"
        assert bytes(view2[:5]) == b"hello"
        view2[100:103] = b"abc"
        assert bytes(view1[PAGE + 100 : PAGE + 103]) == b"abc"
        assert os.pread(memfd.fileno(), 3, PAGE + 100) == b"abc"
        os.pwrite(memfd.fileno(), b"from-fd", 0)
        assert bytes(view1[:7]) == b"from-fd"
        del view1, view2


def test_mapping_outlives_its_fd() -> None:
    memfd = create_memfd("gone", PAGE)
    with memfd.map() as mapping:
        memfd.close()
        view = mapping.view
        view[:3] = b"xyz"
        assert bytes(view[:3]) == b"xyz"
        view.release()


def test_mapping_validation() -> None:
    with create_memfd("v", 2 * PAGE) as memfd:
        with pytest.raises(ValueError, match="offset"):
            memfd.map(PAGE, offset=1)
        with pytest.raises(ValueError, match="positive"):
            Mapping(memfd, 0)
        with pytest.raises(ValueError, match="past the end"):
            memfd.map(PAGE, offset=2 * PAGE)
        with pytest.raises(ValueError, match="past the end"):
            Mapping(memfd, 3 * PAGE)
        readonly_fd = os.open(f"/proc/self/fd/{memfd.fileno()}", os.O_RDONLY)
        try:
            with pytest.raises(PermissionError):
                Mapping(readonly_fd, PAGE)
            with Mapping(readonly_fd, PAGE, prot=Prot.READ) as readonly:
                assert readonly.view.readonly
        finally:
            os.close(readonly_fd)


def test_read_only_mapping_gives_a_read_only_view() -> None:
    with create_memfd("ro", PAGE) as memfd:
        os.pwrite(memfd.fileno(), b"ro", 0)
        with memfd.map(prot=Prot.READ) as mapping:
            view = mapping.view
            assert view.readonly
            assert bytes(view[:2]) == b"ro"
            with pytest.raises(TypeError):
                view[0] = 1
            view.release()
        with (
            memfd.map(prot=Prot.NONE) as inaccessible,
            pytest.raises(ValueError, match="cannot be viewed"),
        ):
            _ = inaccessible.view


def test_close_refuses_while_views_exist_then_unmaps() -> None:
    with create_memfd("close", 2 * PAGE) as memfd:
        mapping = memfd.map()
        view = mapping.view
        part = view[10:20].cast("B")
        del view  # the slice still pins the mapping
        assert mapping.has_views
        with pytest.raises(BufferError):
            mapping.close()
        part.release()
        assert not mapping.has_views
        mapping.close()
        mapping.close()  # idempotent
        assert mapping.closed
        assert not is_mapped(mapping.address)
        with pytest.raises(ValueError, match="closed"):
            _ = mapping.view


def test_context_manager_exit_raises_if_a_view_escapes() -> None:
    with create_memfd("escape", PAGE) as memfd:
        with pytest.raises(BufferError), memfd.map() as mapping:
            escaped = mapping.view
        assert not mapping.closed
        del escaped
        mapping.close()
        assert not is_mapped(mapping.address)


def test_an_error_leaving_the_with_block_is_not_masked_by_live_views() -> None:
    with create_memfd("error", PAGE) as memfd:
        with pytest.raises(RuntimeError, match="boom"), memfd.map() as mapping:
            view = mapping.view
            raise RuntimeError("boom")
        assert not mapping.closed  # deferred: unmapped when the last view goes
        address = mapping.address
        del mapping
        gc.collect()
        assert is_mapped(address)
        del view
        gc.collect()
        assert not is_mapped(address)


def test_dropped_mapping_is_unmapped_only_after_its_last_view() -> None:
    with create_memfd("gc", PAGE) as memfd:
        mapping = memfd.map()
        address = mapping.address
        view = mapping.view
        del mapping
        gc.collect()
        assert is_mapped(address)
        view[:4] = b"live"  # still backed: no crash
        assert os.pread(memfd.fileno(), 4, 0) == b"live"
        del view
        gc.collect()
        assert not is_mapped(address)


def test_repr() -> None:
    with create_memfd("repr", PAGE) as memfd, memfd.map() as mapping:
        assert f"{mapping.address:#x}" in repr(mapping)
        assert mapping.length == PAGE
        assert mapping.offset == 0
        assert mapping.prot == Prot.READ | Prot.WRITE
    assert "closed" in repr(mapping)


# --- guarded copies and shrink seals (the faulting cases: tests/test_hardening_memory.py) ---


def test_guarded_load_and_store_round_trip_and_check_their_range() -> None:
    with create_memfd("guarded", 2 * PAGE) as memfd, memfd.map() as mapping:
        mapping.store(PAGE - 3, b"abcdef")  # across a page boundary
        assert mapping.load(PAGE - 3, 6) == b"abcdef"
        assert os.pread(memfd.fileno(), 6, PAGE - 3) == b"abcdef"
        assert mapping.load(0, 0) == b""
        with pytest.raises(ValueError, match="outside"):
            mapping.load(2 * PAGE - 1, 2)
        with pytest.raises(ValueError, match="outside"):
            mapping.store(-1, b"x")


def test_guarded_copies_respect_the_protection() -> None:
    with create_memfd("prot", PAGE) as memfd:
        with memfd.map(prot=Prot.READ) as read_only:
            assert read_only.load(0, 4) == bytes(4)
            with pytest.raises(ValueError, match="lacks"):
                read_only.store(0, b"x")
        with memfd.map(prot=Prot.NONE) as none, pytest.raises(ValueError, match="lacks"):
            none.load(0, 1)


def test_forbid_shrinking_seals_what_it_can() -> None:
    with create_memfd("sealable", PAGE) as memfd:
        file = require_memory_fd(memfd.fileno(), "test", end=PAGE)
        assert forbid_shrinking(memfd.fileno(), file)
        assert memfd.seals == Seal.SHRINK and file.cannot_shrink
        memfd.resize(2 * PAGE)  # growing is still allowed
        assert forbid_shrinking(memfd.fileno(), file)  # already sealed: nothing to do
    frozen = os.memfd_create("frozen", os.MFD_CLOEXEC)  # sealing refused from birth
    try:
        file = require_memory_fd(frozen, "test", end=0)
        assert not forbid_shrinking(frozen, file)
    finally:
        os.close(frozen)
