"""Selection between a Cython twin and its pure-Python spec.

``QMPSHADOW_NO_EXTENSIONS=1`` selects the Python twin. Otherwise the compiled twin is used
when it imports; selectors expose ``IMPLEMENTATION`` ("c" or "py") so tests can fail when the
compiled twin silently did not load.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def extensions_disabled() -> bool:
    """True when the environment asks for the pure-Python twins."""
    return os.environ.get("QMPSHADOW_NO_EXTENSIONS", "") not in ("", "0")


def load_twin(package: str, name: str) -> tuple[ModuleType, str]:
    """Import ``package.name_c`` (unless disabled or missing), else ``package.name_py``.

    Returns the module and "c" or "py". Never raises for a missing extension: callers expose
    which one is live and the test suite checks it.
    """
    if not extensions_disabled():
        try:
            return importlib.import_module(f"{package}.{name}_c"), "c"
        except ImportError:
            pass
    return importlib.import_module(f"{package}.{name}_py"), "py"
