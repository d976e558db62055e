"""format_lspci_hex: the text format of ``lspci -n -xxx[x]``, checked against real pciutils."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vfiouser_trio.lspci_format import format_lspci_hex
from vfiouser_trio.server.pci import BarSpec, InterruptPin, PciConfigSpace, PciIdentity
from vfiouser_trio.server.pci_caps import (
    ExpressCapability,
    MsiCapability,
    MsixCapability,
    PowerManagementCapability,
    SerialNumberCapability,
    VendorCapability,
    VendorExtendedCapability,
)

LSPCI = shutil.which("lspci")
needs_lspci = pytest.mark.skipif(
    LSPCI is None, reason="pciutils' lspci is not on PATH (apt-get install pciutils)"
)


def test_format_of_a_small_dump() -> None:
    config = bytes(range(64))
    text = format_lspci_hex(config, bdf="01:02.3")
    lines = text.split("\n")
    vendor, device, device_class = 0x0100, 0x0302, 0x0B0A
    assert lines[0] == f"01:02.3 {device_class:04x}: {vendor:04x}:{device:04x} (rev 08)"
    assert lines[1] == "00: " + " ".join(f"{b:02x}" for b in range(16))
    assert lines[4] == "30: " + " ".join(f"{b:02x}" for b in range(48, 64))
    assert text.endswith("\n\n") and len(lines) == 7


def test_no_revision_suffix_when_zero_and_wide_offsets() -> None:
    config = bytearray(4096)
    config[0:4] = b"\x34\x12\x78\x56"
    text = format_lspci_hex(bytes(config), bdf="0000:00:1f.7")
    lines = text.splitlines()
    assert lines[0] == "0000:00:1f.7 0000: 1234:5678"
    assert lines[16].startswith("f0: ")
    assert lines[17].startswith("100: ")
    assert lines[-2].startswith("ff0: ") and lines[-1] == ""


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError):
        format_lspci_hex(bytes(100))
    with pytest.raises(ValueError):
        format_lspci_hex(bytes(256), bdf="0:1.2")
    with pytest.raises(ValueError):
        format_lspci_hex(bytes(256), bdf="00:00.8")


def rich_space() -> PciConfigSpace:
    space = PciConfigSpace(
        PciIdentity(
            vendor_id=0x1B36,
            device_id=0x0010,
            subsystem_vendor_id=0x1AF4,
            subsystem_id=0x1100,
            class_code=0x010802,  # NVMe
            revision=0x02,
        ),
        bars={
            0: BarSpec(0x4000, is_64bit=True),
            2: BarSpec(0x1000, prefetchable=True),
            4: BarSpec(0x100, io=True),
        },
        rom_size=0x40000,
        interrupt_pin=InterruptPin.INTA,
        capabilities=[
            PowerManagementCapability(pme_support=0x19),
            MsiCapability(vectors=4, per_vector_masking=True),
            MsixCapability(table_size=16, table_bar=2, pba_offset=0x800),
            ExpressCapability(link_speed=3, link_width=4, flr=True),
            VendorCapability(b"\x01\x02\x03\x04\x05"),
            SerialNumberCapability(0x0123456789ABCDEF),
            VendorExtendedCapability(0x1234, 1, b"payload!"),
        ],
    )
    # Program the BARs as firmware would, then enable decoding.
    space.write(0x10, struct.pack("<II", 0xFE000000, 0))
    space.write(0x18, struct.pack("<I", 0xFD000000))
    space.write(0x20, struct.pack("<I", 0xC000))
    space.write(0x30, struct.pack("<I", 0xFC000000))
    space.write(0x04, struct.pack("<H", 0x0007))
    return space


def run_lspci(dump: Path, *args: str) -> str:
    assert LSPCI is not None
    result = subprocess.run(
        [LSPCI, "-F", str(dump), *args], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout


@needs_lspci
def test_real_lspci_decodes_the_dump(tmp_path: Path) -> None:
    space = rich_space()
    dump = tmp_path / "config.txt"
    dump.write_text(format_lspci_hex(space.read(0, space.size), bdf="00:04.0"))
    text = run_lspci(dump, "-nn", "-vvv")
    assert "00:04.0 Non-Volatile memory controller [0108]" in text
    assert "[1b36:0010] (rev 02)" in text
    assert "Subsystem: " in text and "[1af4:1100]" in text
    assert "Control: I/O+ Mem+ BusMaster+" in text
    assert "Interrupt: pin A" in text
    assert "Region 0: Memory at fe000000 (64-bit, non-prefetchable)" in text
    assert "Region 2: Memory at fd000000 (32-bit, prefetchable)" in text
    assert "Region 4: I/O ports at c000" in text
    assert "Expansion ROM at fc000000 [disabled]" in text
    assert "Capabilities: [40] Power Management version 3" in text
    assert "MSI: Enable- Count=1/4 Maskable+ 64bit+" in text
    assert "MSI-X: Enable- Count=16 Masked-" in text
    assert "Vector table: BAR=2 offset=00000000" in text
    assert "PBA: BAR=2 offset=00000800" in text
    assert "Express (v2) Endpoint" in text
    assert "FLReset+" in text
    assert "LnkCap:\tPort #0, Speed 8GT/s, Width x4" in text
    assert "Vendor Specific Information: Len=08" in text
    assert "Capabilities: [100 v1] Device Serial Number 01-23-45-67-89-ab-cd-ef" in text
    assert "Vendor Specific Information: ID=1234 Rev=1 Len=010" in text


@needs_lspci
@pytest.mark.parametrize("express", [False, True])
def test_real_lspci_reprints_the_dump_identically(tmp_path: Path, express: bool) -> None:
    space = rich_space() if express else PciConfigSpace(PciIdentity(0x8086, 0x100E, revision=3))
    text = format_lspci_hex(space.read(0, space.size))
    dump = tmp_path / "config.txt"
    dump.write_text(text)
    flag = "-xxxx" if express else "-xxx"
    assert run_lspci(dump, "-n", flag) == text
