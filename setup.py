"""The cffi module and the wheel's tag; all other metadata lives in pyproject.toml.

* ``_native`` is built by cffi from ``vfiouser_trio/_ffi_build.py`` against the limited
  API (cffi sets ``py_limited_api`` on the extension: ``_native.abi3.so``), so the wheel is
  tagged ``cp311-abi3``: one wheel for CPython 3.11 and later.
* The build helper is a build-time file: the sdist carries it (MANIFEST.in), the wheel
  does not.
"""

from setuptools import setup
from setuptools.command.build_py import build_py

#: Modules of the package that are only for building it.
BUILD_ONLY = {("vfiouser_trio", "_ffi_build")}


class BuildPyWithoutBuildHelper(build_py):
    """build_py that leaves the build helper out of the wheel."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) not in BUILD_ONLY]


setup(
    cffi_modules=["vfiouser_trio/_ffi_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithoutBuildHelper},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
