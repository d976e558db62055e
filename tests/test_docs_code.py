"""Every ```python block of README.md and docs/*.md runs as written.

A page's blocks run in order in one namespace, as if the reader pasted them into one file.
What a block does decides how it runs:

- it ends with ``trio.run(serve, device, path)``: the device is served in the background
  (on a temporary socket: every ``"/tmp/....sock"`` path of the page is rewritten to one)
  until the page is done, so the page's client blocks can reach it;
- it ends with any other ``trio.run(main, ...)``: ``main`` is awaited;
- it defines ``test_*`` functions: each runs as a pytest test would, in a trio run of its
  own, with the fixtures it names (``vfio_pair``, ``vfio_tracer``, ``tmp_path``,
  ``autojump_clock``);
- anything else (imports, a device class) just executes.

A block that is not meant to run (a fragment, a signature, a placeholder such as
``MyDevice``) is marked on the line above its fence with ``<!-- not-run: the reason -->``;
an unmarked block that fails fails its page's test.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from vfiouser_trio.server import Device, serve
from vfiouser_trio.testing import NestedDeviceFactory, Tracer

pytestmark = pytest.mark.usefixtures("no_fd_leak")

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(?:python|py)\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"^<!--\s*not-run:(.*?)-->$")
SOCKET_PATH = re.compile(r"""(["'])/tmp/([^"'\s]+\.sock)\1""")
#: Wall-clock bound on one block's awaited call (a page that hangs fails, it does not stall CI).
BLOCK_TIMEOUT = 60


@dataclass
class Block:
    """One fenced block: where it is, its code, and why it is not run (None: it runs)."""

    page: Path
    line: int  # of the fence
    code: str
    not_run: str | None


def python_blocks(page: Path, text: str | None = None) -> list[Block]:
    """The page's python blocks, each with its not-run marker's reason (a reason is required)."""
    text = page.read_text() if text is None else text
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        above = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = NOT_RUN.match(above)
        reason = marker.group(1).strip() if marker else None
        if marker and not reason:
            raise ValueError(f"{page.name}:{line}: a not-run marker must say why")
        blocks.append(Block(page, line, match.group(1), reason))
    return blocks


@dataclass
class PageRun:
    """What a page's blocks left: their namespace, what they printed, the devices served."""

    namespace: dict[str, Any] = field(default_factory=dict)
    printed: list[str] = field(default_factory=list)
    served: list[Device] = field(default_factory=list)


def _trio_run_call(statement: ast.stmt) -> ast.Call | None:
    """The ``trio.run(...)`` call a block ends with, if it does."""
    if not isinstance(statement, ast.Expr) or not isinstance(statement.value, ast.Call):
        return None
    func = statement.value.func
    is_trio_run = (
        isinstance(func, ast.Attribute)
        and func.attr == "run"
        and isinstance(func.value, ast.Name)
        and func.value.id == "trio"
    )
    return statement.value if is_trio_run else None


def _fixtures(
    names: list[str], tmp_path: Path, factory: NestedDeviceFactory, clock: trio.abc.Clock | None
) -> dict[str, Any]:
    known: dict[str, Callable[[], Any]] = {
        "vfio_pair": lambda: factory,
        "vfio_tracer": Tracer,
        "tmp_path": lambda: tmp_path,
        "autojump_clock": lambda: clock,
    }
    unknown = [name for name in names if name not in known]
    if unknown:
        raise LookupError(f"the docs runner has no fixture {', '.join(unknown)}")
    return {name: known[name]() for name in names}


@asynccontextmanager
async def _nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that raises a lone failure as itself, as a test would see it, not in a group."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        raise group.exceptions[0] from None


def _run_test(test: Callable[..., Any], tmp_path: Path) -> None:
    """Run one test function of a block in a trio run of its own, as pytest-trio would."""
    names = list(inspect.signature(test).parameters)
    clock = trio.testing.MockClock(autojump_threshold=0) if "autojump_clock" in names else None

    async def main() -> None:
        async with _nursery() as nursery:
            factory = NestedDeviceFactory(nursery)
            result = test(**_fixtures(names, tmp_path, factory, clock))
            if inspect.isawaitable(result):
                await result
            await factory.aclose()

    trio.run(main, clock=clock)


async def run_block(
    block: Block, run: PageRun, nursery: trio.Nursery, sockets: Path, tmp_path: Path
) -> None:
    """Execute one block in the page's namespace (see the module docstring for how)."""
    code = SOCKET_PATH.sub(lambda m: repr(str(sockets / m.group(2).replace("/", "-"))), block.code)
    tree = ast.parse(code, filename=str(block.page))
    ast.increment_lineno(tree, block.line)  # tracebacks point at the page's own lines
    call = _trio_run_call(tree.body[-1]) if tree.body else None
    if call is not None:
        tree.body.pop()
    tests = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    ]
    exec(compile(tree, str(block.page), "exec"), run.namespace)
    for name in tests:
        await trio.to_thread.run_sync(_run_test, run.namespace[name], tmp_path)
    if call is None:
        return
    func, *args = [
        eval(compile(ast.Expression(arg), str(block.page), "eval"), run.namespace)
        for arg in call.args
    ]
    if func is serve:
        run.served.extend(arg for arg in args if isinstance(arg, Device))
        await nursery.start(partial(serve, *args))
    else:
        with trio.fail_after(BLOCK_TIMEOUT):
            await func(*args)


async def run_page(page: Path, tmp_path: Path, text: str | None = None) -> PageRun:
    """Run a page's unmarked python blocks in order; servers stop when the page is done."""
    run = PageRun()
    run.namespace["print"] = lambda *args, **_: run.printed.append(" ".join(map(str, args)))
    sockets = tmp_path / "sockets"
    sockets.mkdir(exist_ok=True)
    async with _nursery() as nursery:
        for block in python_blocks(page, text):
            if block.not_run is None:
                try:
                    await run_block(block, run, nursery, sockets, tmp_path)
                except BaseException as exc:
                    exc.add_note(f"in the python block at {page.name}:{block.line}")
                    raise
        nursery.cancel_scope.cancel()
    return run


@pytest.mark.parametrize(
    "page",
    [page for page in PAGES if python_blocks(page)],
    ids=lambda page: str(page.relative_to(ROOT)),
)
async def test_page_code_runs(page: Path, tmp_path: Path) -> None:
    run = await run_page(page, tmp_path)
    expected = PRINTS.get(str(page.relative_to(ROOT)))
    if expected is not None:
        assert run.printed == expected


#: What the pages' clients print, as their text says.
PRINTS = {
    "README.md": ["1234:0001", "1"],
    "docs/tutorial.md": ["1234:5c7a", "42", "interrupt"],
    "docs/client.md": ["4096", "b'guestmem'", "1"],
    "docs/migration.md": ["True", "41"],
}


async def test_readme_device_counts_the_client_write(tmp_path: Path) -> None:
    run = await run_page(ROOT / "README.md", tmp_path)
    [device] = run.served
    assert device.count == 1  # type: ignore[attr-defined]


#: The packages whose every exported name (``__all__``) the API reference (docs/api/) documents.
PUBLIC = [
    "vfiouser_trio",
    "vfiouser_trio.server",
    "vfiouser_trio.client",
    "vfiouser_trio.testing",
    "vfiouser_trio.limits",
]


@pytest.mark.parametrize("package", PUBLIC)
def test_the_api_reference_names_every_exported_name(package: str) -> None:
    reference = "\n".join(page.read_text() for page in (ROOT / "docs" / "api").glob("*.rst"))
    named = set(re.findall(r"[A-Za-z_]\w*", reference))
    missing = [name for name in importlib.import_module(package).__all__ if name not in named]
    assert not missing, f"docs/api/ does not document {package}'s {', '.join(missing)}"


# --- the runner itself: it fails on what does not run, and runs only what it should --------

BROKEN_PAGE = """\
Runs:

```python
import trio

async def main() -> None:
    raise RuntimeError("the block ran")

trio.run(main)
```
"""


async def test_runner_fails_on_a_broken_block(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the block ran") as caught:
        await run_page(tmp_path / "broken.md", tmp_path, BROKEN_PAGE)
    assert "in the python block at broken.md:3" in caught.value.__notes__


async def test_runner_skips_only_marked_blocks(tmp_path: Path) -> None:
    marked = BROKEN_PAGE.replace("```python", "<!-- not-run: a fragment -->\n```python")
    run = await run_page(tmp_path / "marked.md", tmp_path, marked)
    assert "main" not in run.namespace
    with pytest.raises(ValueError, match="must say why"):
        unexplained = BROKEN_PAGE.replace("```python", "<!-- not-run: -->\n```python")
        python_blocks(tmp_path / "bad.md", unexplained)


async def test_runner_runs_defined_tests_with_their_fixtures(tmp_path: Path) -> None:
    page = """\
```python
from vfiouser_trio.examples.null import NullDevice

async def test_fails(vfio_pair, autojump_clock):
    pair = await vfio_pair(NullDevice())
    assert await pair.client.read(0, 0, 4) == b"not this"
```
"""
    with pytest.raises(AssertionError):
        await run_page(tmp_path / "test.md", tmp_path, page)
