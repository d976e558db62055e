"""Shim that registers the cffi builder; all other metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["vfiouser_trio/_ffi_build.py:ffibuilder"])
