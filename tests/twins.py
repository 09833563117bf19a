"""Helpers for suites that run against both twins of a Cython module."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from qmpshadow._twins import extensions_disabled


def twin_modules(package: str, name: str) -> list[object]:
    """pytest params: the Python twin always; the compiled one unless disabled."""
    params: list[object] = [pytest.param(importlib.import_module(f"{package}.{name}_py"),
                                         id="py")]
    if not extensions_disabled():
        try:
            mod: ModuleType | None = importlib.import_module(f"{package}.{name}_c")
        except ImportError:
            mod = None
        # A missing compiled twin fails the run instead of silently testing only Python.
        params.append(pytest.param(mod, id="c"))
    return params
