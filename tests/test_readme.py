"""The README's device and client examples run as written (with a temporary socket path)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import trio

from vfiouser_trio.testing import NestedDeviceFactory
from vfiouser_trio.testing.fixtures import *  # noqa: F403 - the plugin's fixtures, installed or not

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


async def test_readme_device_and_client_examples(tmp_path: Path) -> None:
    device_code, client_code = python_blocks()[:2]
    path = str(tmp_path / "counter.sock")
    # Both blocks end by starting trio themselves; here they run inside this test's trio.
    assert device_code.rstrip().endswith('trio.run(serve, Counter(), "/tmp/counter.sock")')
    assert client_code.rstrip().endswith("trio.run(main)")
    device_ns: dict[str, Any] = {}
    exec(device_code.rstrip().rsplit("\n", 1)[0], device_ns)
    client_ns: dict[str, Any] = {}
    exec(client_code.replace("/tmp/counter.sock", path).rsplit("\n", 2)[0], client_ns)
    device = device_ns["Counter"]()
    printed: list[str] = []
    client_ns["print"] = lambda *args: printed.append(" ".join(map(str, args)))
    async with trio.open_nursery() as nursery:
        await nursery.start(device_ns["serve"], device, path)
        with trio.fail_after(30):
            await client_ns["main"]()
        nursery.cancel_scope.cancel()
    assert printed == ["1234:0001", "1"]
    assert device.count == 1
    device.close()


async def test_readme_testing_example(vfio_pair: NestedDeviceFactory) -> None:
    device_code, _, test_code = python_blocks()[:3]
    namespace: dict[str, Any] = {}
    exec(device_code.rstrip().rsplit("\n", 1)[0], namespace)
    exec(test_code, namespace)
    await namespace["test_counter_counts_writes"](vfio_pair)
