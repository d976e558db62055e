"""Packaging, checked without building (a build takes ~15 s: .ci/packaging builds the sdist
and the wheel and checks the tag, the contents and the installed package)."""

from __future__ import annotations

import os
import runpy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from setuptools import Distribution

import vfiouser_trio
import vfiouser_trio._native
from vfiouser_trio import cli
from vfiouser_trio._ffi_build import LIMITED_API, ffibuilder

ROOT = Path(__file__).resolve().parents[1]


def setup_arguments(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What setup.py passes to setuptools.setup()."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr("setuptools.setup", lambda **kwargs: seen.update(kwargs))
    runpy.run_path(str(ROOT / "setup.py"))
    return seen


def test_the_wheel_is_tagged_abi3_and_the_module_built_with_the_limited_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert setup_arguments(monkeypatch)["options"]["bdist_wheel"] == {"py_limited_api": "cp311"}
    *_, options = ffibuilder._assigned_source
    assert LIMITED_API in options["define_macros"]
    assert LIMITED_API[1] == "0x030B0000"  # the cp311 of the tag
    assert vfiouser_trio._native.__file__.endswith(".abi3.so")


def test_the_wheel_leaves_the_build_helper_out_but_the_sdist_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    distribution = Distribution({"script_name": str(ROOT / "setup.py")})
    build_py = setup_arguments(monkeypatch)["cmdclass"]["build_py"](distribution)
    package_dir = str(ROOT / "vfiouser_trio")
    modules = {name for _, name, _ in build_py.find_package_modules("vfiouser_trio", package_dir)}
    assert "_ffi_build" not in modules and {"cli", "engine", "__init__"} <= modules
    manifest = (ROOT / "MANIFEST.in").read_text().splitlines()
    assert "include vfiouser_trio/_ffi_build.py" in manifest  # setup.py's cffi_modules needs it


def test_one_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == vfiouser_trio.__version__


def test_bench_from_an_install_without_the_source_tree_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The package as installed in site-packages: no bench/ beside it. A bench/ in the current
    # directory is another tree's, and is not imported.
    installed = tmp_path / "site-packages" / "vfiouser_trio"
    installed.mkdir(parents=True)
    monkeypatch.setattr(cli, "__file__", os.fspath(installed / "cli.py"))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "run.py").write_text("raise AssertionError('imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(os.fspath(tmp_path))
    with pytest.raises(SystemExit) as refused:
        cli.main(["bench", "--quick"])
    assert "the benchmarks are not installed with the package" in str(refused.value.code)
    assert capsys.readouterr().err == ""
