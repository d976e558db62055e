"""A Device you cannot misuse: one test per stumble of issue 11 that the fence removes.

The framework's machinery is off the subclass's namespace (server/device_runtime.py),
framework names are refused when a subclass defines or assigns them, hooks of the wrong
kind are refused when the class is created, declarations are checked as a whole when
serving starts, ``add_bar(memory=True).memory`` needs no assert, and the constants an
author needs come from ``vfiouser_trio.server``.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mypy import api as mypy_api  # in the test extra: the typing test runs, never skips

from vfiouser_trio.protocol import PciRegion
from vfiouser_trio.server import Device, DeviceServer, PciIdentity, SparseArea
from vfiouser_trio.testing import nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

ID = PciIdentity(vendor_id=0x1234, device_id=0x11F0, class_code=0xFF0000)

#: What a subclass sees of the framework (the module docstring of server/device.py).
AUTHOR_API = {
    # declarations
    "add_bar",
    "add_rom",
    "add_region",
    "add_irq",
    "add_intx",
    "add_msi",
    "add_msix",
    "add_capability",
    "add_config_registers",
    "add_vendor_capability",
    "add_doorbell",
    "enable_migration",
    # services
    "name",
    "identity",
    "dma",
    "config",
    "irqs",
    "region",
    "trigger",
    "active_irq_index",
    "migration",
    # hooks
    "reset",
    "attached",
    "detached",
    "run",
    "close",
    "dma_mapped",
    "dma_unmapped",
    "irq_state_changed",
    "save_state",
    "load_state",
    "save_chunks",
    "precopy_chunks",
    "load_chunk",
    "on_stop",
    "on_run",
    "on_begin_save",
    "on_end_save",
    "on_begin_resume",
    "on_end_resume",
}


def test_a_subclass_sees_the_author_api_and_no_session_machinery() -> None:
    device = Device(ID)
    public = {name for name in dir(device) if not name.startswith("_")}
    assert public == AUTHOR_API
    device.close()
    for session_only in ("do_reset", "client_gone", "quiesce", "num_regions", "regions"):
        assert not hasattr(Device, session_only)


class Plain(Device):
    def __init__(self) -> None:
        super().__init__(ID, name="plain0")
        self.add_bar(0, 0x1000, read=self.read0)

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes([0xA5]) * size


def test_assigning_config_is_refused_naming_the_class_and_the_fix() -> None:
    device = Plain()
    with pytest.raises(AttributeError) as refused:
        device.config = {"mode": 1}  # type: ignore[assignment]  # the misuse under test
    message = str(refused.value)
    assert message.startswith("Plain: self.config = ... would replace the framework's 'config'")
    assert "rename your attribute, e.g. self.config_regs" in message
    device.close()


def test_replacing_a_framework_method_on_the_device_is_refused_when_serving_starts() -> None:
    device = Plain()
    device.trigger = lambda *args: True  # type: ignore[method-assign]
    with pytest.raises(AttributeError) as refused:
        DeviceServer(device)
    message = str(refused.value)
    assert message.startswith("Plain: self.trigger = ... replaced the framework's 'trigger'")
    assert "rename your attribute, e.g. self.my_trigger" in message
    device.close()


def test_replacing_the_dma_table_is_refused_when_serving_starts() -> None:
    device = Plain()
    device.dma = None  # type: ignore[assignment]
    with pytest.raises(AttributeError, match=r"^Plain: self.dma = ... replaced the framework's"):
        DeviceServer(device)
    device.close()


def test_defining_a_framework_name_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError) as refused:

        class Shadowing(Device):
            def trigger(self, vector: int = 0, *, index: int | None = None) -> bool:
                return False

    message = str(refused.value)
    assert "Shadowing defines 'trigger', a name of the Device framework" in message
    assert "rename your attribute, e.g. self.my_trigger" in message
    with pytest.raises(TypeError, match=r"Named defines 'name'.*pass name= to Device.__init__"):

        class Named(Device):
            name = "mine"


async def test_the_subclass_own_regions_and_private_names_do_not_collide() -> None:
    class Own(Plain):
        def __init__(self) -> None:
            super().__init__()
            # Names the framework used to keep on the device itself.
            self.regions = ["ring", "window"]
            self._config = {"speed": 3}
            self._irqs = None
            self._errors = 0

    device = Own()
    async with nested_device(device) as pair:
        assert await pair.client.read(PciRegion.BAR0, 0, 4) == b"\xa5" * 4
        await pair.client.reset()
    assert device.regions == ["ring", "window"]
    device.close()


def test_a_plain_def_where_the_framework_awaits_is_refused() -> None:
    with pytest.raises(TypeError) as refused:

        class Eager(Device):
            def reset(self) -> None:  # type: ignore[override]
                pass

    assert str(refused.value).startswith("Eager.reset must be 'async def'")


def test_an_async_def_where_the_framework_iterates_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Saver.save_chunks is an 'async def' returning a value"):

        class Saver(Device):
            async def save_chunks(self) -> bytes:  # type: ignore[override]
                return b""


def test_closing_without_super_is_refused_and_with_super_accepted() -> None:
    with pytest.raises(TypeError, match=r"Leaky.close must call super\(\).close\(\)"):

        class Leaky(Device):
            def close(self) -> None:
                pass

    with pytest.raises(TypeError, match=r"Later.close must be a plain 'def'"):

        class Later(Device):
            async def close(self) -> None:  # type: ignore[override]
                super().close()

    class Tidy(Plain):
        closed = False

        def close(self) -> None:
            super().close()
            self.closed = True

        async def precopy_chunks(self) -> AsyncIterator[bytes]:
            yield b""

    device = Tidy()
    device.close()
    assert device.closed


def test_a_doorbell_in_a_sparse_mmap_area_is_refused_when_serving_starts() -> None:
    class Bells(Device):
        def __init__(self) -> None:
            super().__init__(ID, name="bells0")
            self.add_bar(1, 0x2000, sparse=[SparseArea(0x1000, 0x1000)])
            self.add_doorbell(1, 0x1000)

    device = Bells()
    with pytest.raises(ValueError) as refused:
        DeviceServer(device)
    message = str(refused.value)
    assert message.startswith("bells0: doorbell at BAR1 0x1000+0x4: inside the sparse mmap area")
    assert "move the doorbell out of the sparse areas" in message
    device.close()


def test_a_doorbell_under_the_msix_table_is_refused_when_serving_starts() -> None:
    class Bells(Device):
        def __init__(self) -> None:
            super().__init__(ID, name="bells1")
            self.add_bar(2, 0x1000)
            self.add_msix(4, bar=2)
            self.add_doorbell(2, 0x10)

    device = Bells()
    with pytest.raises(ValueError, match=r"^bells1: doorbell at BAR2 0x10\+0x4: under the MSI-X"):
        DeviceServer(device)
    device.close()


@pytest.mark.parametrize(
    ("declare", "problem"),
    [
        (
            lambda d: d.add_bar(1, 0x2000, sparse=[SparseArea(0x800, 0x800)]),
            "odd0: region 1 sparse area 0x800+0x800: not page-aligned",
        ),
        (lambda d: d.add_doorbell(3, 0), "odd0: doorbell at region 3 0x0+0x4: region 3 is not"),
        (lambda d: d.add_irq(-1, 1), "odd0: IRQ index -1"),
        (lambda d: d.add_region(200, 0x1000), "odd0: region 200: add_region declares regions"),
    ],
)
def test_declarations_out_of_range_are_refused_naming_device_region_and_fix(
    declare: object, problem: str
) -> None:
    device = Device(ID, name="odd0")
    with pytest.raises(ValueError) as refused:
        declare(device)  # type: ignore[operator]
    assert str(refused.value).startswith(problem)
    device.close()


def test_the_author_imports_constants_from_the_server_package() -> None:
    from vfiouser_trio import MigState as TopMigState  # noqa: PLC0415
    from vfiouser_trio.server import (  # noqa: PLC0415
        IRQ_INFO_EVENTFD,
        DeviceCodeError,
        MigrationRefused,
        MigState,
        PciIrq,
    )

    assert MigState is TopMigState and MigState.STOP_COPY.name == "STOP_COPY"
    assert IRQ_INFO_EVENTFD == 1 and PciIrq.MSIX.value == 2
    assert issubclass(MigrationRefused, Exception) and issubclass(DeviceCodeError, Exception)


def test_a_memory_bar_needs_no_assert_for_the_type_checker(tmp_path: Path) -> None:
    source = tmp_path / "author.py"
    source.write_text(
        textwrap.dedent(
            """
            from vfiouser_trio.server import Device, PciIdentity

            class Window(Device):
                def __init__(self) -> None:
                    super().__init__(PciIdentity(vendor_id=0x1234, device_id=1))
                    self.window = self.add_bar(2, 0x1000, memory=True).memory.view
                    self.mapped = self.add_bar(4, 0x1000, mmap=True).memory.view
            """
        )
    )
    out, err, status = mypy_api.run(
        ["--strict", "--follow-imports=silent", "--cache-dir=/dev/null", str(source)]
    )
    assert status == 0, out + err


def test_declarations_that_conflict_as_a_whole_are_refused_before_any_client_comes() -> None:
    device = Device(ID, name="wide0")
    device.add_bar(0, 0x1000, is_64bit=True)
    device.add_bar(1, 0x1000)  # the upper half of BAR0
    with pytest.raises(ValueError) as refused:
        DeviceServer(device)
    message = str(refused.value)
    assert message.startswith("wide0: the declarations do not make a valid config space: BAR 1")
    assert "change the add_* calls" in message
    device.close()
