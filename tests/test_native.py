"""The cffi extension itself: its calling conventions, and that the stub matches it.

Build the extension first: ``python vfiouser_trio/_ffi_build.py`` (in place) or
``pip install -e .``.
"""

from __future__ import annotations

import ast
import errno
import mmap
import os
import pathlib

from vfiouser_trio import _native
from vfiouser_trio._native import ffi, lib

STUB = pathlib.Path(_native.__file__).with_name("_native.pyi")


def _stub_lib_names() -> set[str]:
    tree = ast.parse(STUB.read_text())
    (lib_class,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib")
    names: set[str] = set()
    for node in lib_class.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_stub_declares_exactly_what_the_extension_exports() -> None:
    assert _stub_lib_names() == set(dir(lib))


def test_constants_agree_with_the_stdlib() -> None:
    assert lib.PROT_READ == mmap.PROT_READ
    assert lib.PROT_WRITE == mmap.PROT_WRITE
    assert lib.MAP_SHARED == mmap.MAP_SHARED
    assert lib.MAP_PRIVATE == mmap.MAP_PRIVATE
    # Linux UAPI values (asm-generic), not in the mmap module.
    assert lib.MAP_FIXED == 0x10
    assert lib.MAP_FIXED_NOREPLACE == 0x100000


def test_mmap_returns_minus_errno() -> None:
    bad = lib.vfu_mmap(0, 4096, lib.PROT_READ, lib.MAP_SHARED, -1, 0)
    assert bad == -errno.EBADF
    fd = os.memfd_create("native-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        # An unaligned file offset is the kernel's EINVAL.
        assert lib.vfu_mmap(0, 4096, lib.PROT_READ, lib.MAP_SHARED, fd, 1) == -errno.EINVAL
        address = lib.vfu_mmap(0, 4096, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd, 0)
        assert address > 0
        assert address % mmap.PAGESIZE == 0
        ffi.buffer(ffi.cast("char *", address), 4)[:] = b"ping"
        assert os.pread(fd, 4, 0) == b"ping"
        assert lib.vfu_msync(address, 4096, lib.MS_SYNC) == 0
        assert lib.vfu_madvise(address + 1, 4096, mmap.MADV_NORMAL) == -errno.EINVAL
        assert lib.vfu_munmap(address + 1, 4096) == -errno.EINVAL
        assert lib.vfu_munmap(address, 4096) == 0
    finally:
        os.close(fd)


def test_atomic_primitives_operate_in_place() -> None:
    data = bytearray(16)
    base = ffi.from_buffer(data, require_writable=True)
    lib.vfu_store_u64(base, 8, 0x1122334455667788, lib.VFU_ORDER_RELEASE)
    assert data[8:16] == (0x1122334455667788).to_bytes(8, "little")
    assert lib.vfu_rmw_u32(base, 0, lib.VFU_OP_ADD, 7, lib.VFU_ORDER_RELAXED) == 0
    assert lib.vfu_cas_u32(base, 0, 7, 9, lib.VFU_ORDER_SEQ_CST, lib.VFU_ORDER_SEQ_CST) == 7
    assert lib.vfu_load_u32(base, 0, lib.VFU_ORDER_ACQUIRE) == 9


def test_bit_primitives() -> None:
    words = bytearray(16)
    cdata = ffi.from_buffer("uint64_t[]", words, require_writable=True)
    lib.vfu_bits_set(cdata, 62, 4)  # crosses the word boundary
    assert int.from_bytes(words[:8], "little") == 0b11 << 62
    assert int.from_bytes(words[8:], "little") == 0b11
    assert lib.vfu_bits_count(cdata, 0, 128) == 4
    assert lib.vfu_bits_next(cdata, 0, 128, 1) == 62
    assert lib.vfu_bits_next(cdata, 62, 128, 0) == 66
    assert lib.vfu_bits_next(cdata, 66, 128, 1) == -1
