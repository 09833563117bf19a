"""What a checkpoint source captures: one epoch of the primary, source-agnostic."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..frames.wire import BlockFlags, DeviceStateFormat, RamBlock


@dataclass(slots=True)
class CapturedEpoch:
    """Epoch ``number``: the pages that changed (or all, when ``full``) and device state.

    ``main`` maps page index → page bytes of the main (shared) RAM block; ``small`` maps
    each small block to its pages (offset → bytes); ``device_state`` is in
    ``device_format``. ``reported_pages`` counts pages QEMU reported dirty (or the scan
    found changed), ``pause_ms`` the primary's pause for this checkpoint when known.
    """

    number: int
    full: bool
    blocks: tuple[RamBlock, ...]
    main_block: str
    page_size: int
    main: dict[int, bytes] = field(default_factory=dict)
    small: dict[str, dict[int, bytes]] = field(default_factory=dict)
    device_state: bytes = b""
    device_format: DeviceStateFormat = DeviceStateFormat.QEMU_SECTIONS
    reported_pages: int = 0
    pause_ms: float | None = None
    #: Disk bytes at the checkpoint: (disk index, byte offset, data) (docs/disks.md).
    disk: list[tuple[int, int, bytes]] = field(default_factory=list)
    #: The pages were found changed by a hash scan (shared-RAM source): the encoder's
    #: unchanged filter, which only knows pages it was fed, must not drop any of them.
    scanned: bool = False
    #: Disks are replicated (``disk`` may still be empty: nothing was written), and
    #: whether this epoch's disk capture copied every block.
    disks: bool = False
    disk_full: bool = False
    #: The disk capture of this checkpoint failed: never ship it (the next epoch is full).
    disk_failed: bool = False
    #: The epoch whose state the pages were taken against (the previous capture; 0 when
    #: ``full``): they complete that state and no other, so the source agent ships the
    #: epoch as a delta only right after that one.
    base: int = 0

    @property
    def raw_bytes(self) -> int:
        """Bytes of the changed pages as raw pages (the baseline for wire ratios)."""
        return (len(self.main) + sum(len(p) for p in self.small.values())) * self.page_size


def block_table(decls: list[tuple[str, int]], main_block: str) -> tuple[RamBlock, ...]:
    """Frames' block table: the main block as pages, every other block SMALL."""
    return tuple(
        RamBlock(idstr=idstr, length=length,
                 flags=BlockFlags.NONE if idstr == main_block else BlockFlags.SMALL)
        for idstr, length in decls
    )
