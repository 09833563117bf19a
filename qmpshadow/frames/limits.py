"""Bounds shared by the frame format, the page codec and the page hash (both twins).

The compiled twins repeat these numbers (C needs them at compile time); the test suite checks
that both twins report the same values.
"""

from __future__ import annotations

from typing import Final

from qmpshadow.errors import ConfigError

#: Smallest page size a session may use (QEMU's smallest target page is 1 KiB; 512 keeps tests
#: small). A power of two, so page offsets are shifts and every page holds whole u64 words.
PAGE_SIZE_MIN: Final = 512
#: Largest page size. Keeps a page's delta body length in a 3-byte varint and bounds the
#: scratch memory of one page.
PAGE_SIZE_MAX: Final = 1 << 20

#: Default bound on a frame's payload (wire bytes, and decompressed bytes for zstd frames).
DEFAULT_MAX_PAYLOAD: Final = 256 << 20
#: The payload length is a u32 on the wire.
PAYLOAD_LIMIT: Final = 0xFFFF_FFFF

#: Output room the encoder needs per page beyond the page itself (records are at most
#: page_size + 10 bytes; the compiled encoder drafts a DELTA in place before choosing).
ENCODE_SLACK: Final = 16

#: Cache tag of an empty slot of the sender's previous-version cache.
EMPTY_TAG: Final = 0xFFFF_FFFF_FFFF_FFFF


def check_page_size(page_size: int) -> None:
    """Raise ConfigError unless ``page_size`` is a power of two within the bounds."""
    if (
        not isinstance(page_size, int)
        or page_size < PAGE_SIZE_MIN
        or page_size > PAGE_SIZE_MAX
        or page_size & (page_size - 1)
    ):
        raise ConfigError(
            f"page size must be a power of two in [{PAGE_SIZE_MIN}, {PAGE_SIZE_MAX}], "
            f"got {page_size!r}"
        )
