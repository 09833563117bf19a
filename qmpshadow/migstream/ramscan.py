"""Selector for the RAM-record hot loop: compiled twin when present, else the Python spec.

``IMPLEMENTATION`` is "c" or "py"; ``QMPSHADOW_NO_EXTENSIONS=1`` forces "py".
"""

from __future__ import annotations

from .._twins import load_twin

_mod, IMPLEMENTATION = load_twin(__package__ or "qmpshadow.migstream", "_ramscan")

NEED_DATA: int = _mod.NEED_DATA
SPECIAL: int = _mod.SPECIAL
LIMIT: int = _mod.LIMIT
scan_records = _mod.scan_records
apply_records = _mod.apply_records

__all__ = ["IMPLEMENTATION", "LIMIT", "NEED_DATA", "SPECIAL", "apply_records", "scan_records"]
