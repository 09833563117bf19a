"""Page codec selector: the compiled twin when it loads, else the pure-Python spec.

``IMPLEMENTATION`` says which one is live ("c" or "py"); ``QMPSHADOW_NO_EXTENSIONS=1`` forces
"py". The record format and the functions are documented in ``_pagecodec_py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpshadow._twins import load_twin

_mod, IMPLEMENTATION = load_twin(__package__, "_pagecodec")

if TYPE_CHECKING:
    from qmpshadow.frames._pagecodec_py import (
        DELTA,
        EMPTY_TAG,
        ENCODE_SLACK,
        FULL,
        ZERO,
        apply_pages,
        check_pages,
        encode_pages,
        encode_pages_into,
    )
else:
    encode_pages = _mod.encode_pages
    encode_pages_into = _mod.encode_pages_into
    ENCODE_SLACK = _mod.ENCODE_SLACK
    apply_pages = _mod.apply_pages
    check_pages = _mod.check_pages
    ZERO = _mod.ZERO
    FULL = _mod.FULL
    DELTA = _mod.DELTA
    EMPTY_TAG = _mod.EMPTY_TAG

__all__ = [
    "DELTA",
    "EMPTY_TAG",
    "ENCODE_SLACK",
    "FULL",
    "IMPLEMENTATION",
    "ZERO",
    "apply_pages",
    "check_pages",
    "encode_pages",
    "encode_pages_into",
]
