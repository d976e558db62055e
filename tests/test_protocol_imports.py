"""protocol/ is sans-io: none of its modules imports trio or socket."""

from __future__ import annotations

import ast
from pathlib import Path

import vfiouser_trio.protocol

FORBIDDEN = {"trio", "socket", "select", "selectors", "asyncio"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_protocol_modules_import_no_io() -> None:
    package = Path(vfiouser_trio.protocol.__file__).parent
    files = sorted(package.glob("*.py"))
    assert len(files) > 10
    for path in files:
        assert not imported_roots(path) & FORBIDDEN, path.name
