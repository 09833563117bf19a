"""The promotion stream: what the shadow QEMU loads to become the primary (sans-I/O).

A warm-standby shadow QEMU waits in ``-incoming defer`` with ``x-ignore-shared`` on and
its main RAM mapped from the replica's RAM file. Promotion feeds it a migration stream
that carries everything *except* that RAM::

    header (QEVM, version 3)
    CONFIGURATION: machine type, configuration/capabilities = [x-ignore-shared]
    SECTION_START ram (id 2, instance 0, version 4)
      MEM_SIZE: every block with its used length and a be64 GPA (0 for all: QEMU 7.2
                compares it only for ignored blocks, whose GPA is 0 for a RAM backend)
      PAGE/ZERO records of every page of the small blocks (none of the shared block)
      EOS, footer
    the committed device sections (SECTION_FULL ... ), EOF
    VMDESCRIPTION listing them (QEMU reads it after EOF; without one it logs a warning)

:func:`build_promotion_stream` builds it from a replica's committed epoch:

- device state in ``QEMU_SECTIONS`` format (a COLO checkpoint's FULL sections ending in
  EOF): composed as above, the small blocks coming from the replica;
- ``IGNORE_SHARED_STREAM`` (what the shared-RAM source captured with ``migrate`` and
  x-ignore-shared): that stream already *is* a promotion stream and is replayed as-is,
  after checking that its small-block pages are byte for byte what the replica holds.

Either way the result is parsed with :class:`~qmpshadow.migstream.StreamParser` and
checked (x-ignore-shared declared, the block table, no page of the shared block, every
small-block page present and equal to the replica's, device sections, EOF, no COMMAND
or COLO content) before it is returned: QEMU exits on a stream it cannot load, so a bad
one must never reach it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qmpshadow.errors import StreamFormatError
from qmpshadow.frames.wire import BlockFlags, DeviceStateFormat, RamBlock
from qmpshadow.migstream import StreamParser, StreamWriter
from qmpshadow.migstream.constants import QEMU_VM_FILE_VERSION, RamFlag
from qmpshadow.migstream.events import (
    ColoMessageEvent,
    ColoVmstate,
    CommandSection,
    Configuration,
    DeviceSection,
    EndOfStream,
    Eof,
    Event,
    Header,
    RamBlockDecl,
    RamEos,
    RamMemSize,
    RamRecords,
    RamXbzrle,
    SectionFooter,
    SectionStart,
    Subsection,
    VmDescription,
    encode_capabilities,
)
from qmpshadow.shadow.errors import PromotionStreamError
from qmpshadow.shadow.replica import CommittedDeviceState

__all__ = [
    "RAM_SECTION_ID",
    "PromotionBuilder",
    "PromotionStream",
    "ReplicaView",
    "TargetBlock",
    "build_promotion_stream",
    "check_promotion_stream",
]

#: Section id QEMU 7.2 gives the ``ram`` section (its device sections never use it).
RAM_SECTION_ID = 2
RAM_SECTION_VERSION = 4
_CAPABILITY = "x-ignore-shared"
_MAX_SECTION_ID = 0xFFFF_FFFF


class ReplicaView(Protocol):
    """What the builder reads from a replica (:class:`~qmpshadow.shadow.replica.Replica`
    provides it)."""

    @property
    def committed_epoch(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def blocks(self) -> tuple[RamBlock, ...]: ...
    @property
    def machine_type(self) -> str | None: ...
    @property
    def device_state(self) -> CommittedDeviceState | None: ...
    def small_block(self, idstr: str) -> bytes: ...


@dataclass(frozen=True, slots=True)
class TargetBlock:
    """A RAM block of the shadow QEMU (from ``info ramblock``): ``used_length`` now and
    ``max_length`` it may be resized to (resizable blocks such as ACPI tables)."""

    idstr: str
    used_length: int
    max_length: int


@dataclass(frozen=True, slots=True)
class PromotionStream:
    """A validated promotion stream for ``epoch`` of ``generation``.

    ``data`` is what to write to the shadow's incoming socket; ``small_pages`` counts the
    small-block pages in it, ``device_sections`` its device sections; ``replayed`` is
    True when ``data`` is the source's own x-ignore-shared stream.
    """

    data: bytes
    generation: int
    epoch: int
    format: DeviceStateFormat
    machine_type: str
    small_pages: int
    device_sections: int
    replayed: bool


@dataclass(slots=True)
class _Parsed:
    config: Configuration | None = None
    mem: RamMemSize | None = None
    ram_sections: int = 0
    # block -> offset -> page bytes (PAGE) or the fill byte (ZERO)
    pages: dict[str, dict[int, bytes]] = field(default_factory=dict)
    devices: list[DeviceSection] = field(default_factory=list)
    eof: bool = False
    vmdesc: bool = False
    page_size: int = 4096


def _fail(what: str, fix: str) -> PromotionStreamError:
    return PromotionStreamError(f"cannot promote: {what}; {fix}")


def _parse(data: bytes, what: str) -> _Parsed:
    """Parse a whole stream into what promotion checks; PromotionStreamError if it does not
    parse or holds what a promotion stream must not."""
    parser = StreamParser()
    out = _Parsed()
    try:
        parser.receive_data(data)
        parser.receive_data(b"")
        events: list[Event] = parser.events()
    except StreamFormatError as exc:
        raise _fail(f"the {what} does not parse as a QEMU 7.2 migration stream ({exc})",
                    "the committed device state is unusable: resync the replica") from None
    out.page_size = parser.page_size
    for ev in events:
        if isinstance(ev, Configuration):
            out.config = ev
        elif isinstance(ev, SectionStart):
            out.ram_sections += 1
        elif isinstance(ev, RamMemSize):
            out.mem = ev
        elif isinstance(ev, RamRecords):
            ps = ev.page_size
            for flags, offset, block, pos in ev.records:
                n = ps if flags & RamFlag.PAGE else 1
                out.pages.setdefault(block, {})[offset] = bytes(ev.data[pos : pos + n])
        elif isinstance(ev, DeviceSection):
            out.devices.append(ev)
        elif isinstance(ev, Eof):
            out.eof = True
        elif isinstance(ev, VmDescription):
            out.vmdesc = True
        elif isinstance(ev, RamXbzrle):
            raise _fail(f"the {what} holds XBZRLE pages, which cannot be checked against the "
                        "replica", "capture device state without the xbzrle capability")
        elif isinstance(ev, CommandSection | ColoMessageEvent | ColoVmstate):
            raise _fail(f"the {what} holds {type(ev).__name__} content (commands or COLO "
                        "framing), which would change how the shadow QEMU loads it",
                        "store device state as plain sections or a plain x-ignore-shared "
                        "stream")
    return out


def check_promotion_stream(
    data: bytes,
    replica: ReplicaView,
    *,
    machine_type: str | None = None,
    target: Sequence[TargetBlock] | None = None,
    what: str = "promotion stream",
) -> tuple[str, int, int]:
    """Check that ``data`` is a promotion stream for ``replica``'s committed state.

    Checks: it parses completely (header, sections, EOF, optional vmdesc, nothing after);
    the configuration declares ``x-ignore-shared`` (and ``machine_type`` when given); one
    RAM section whose MEM_SIZE lists exactly the replica's blocks and lengths; no page of
    the shared block; every page of every small block, each equal to the replica's; at
    least one device section; no commands or COLO content. With ``target`` (the shadow
    QEMU's blocks), both must have the same set of blocks, each with room for its length,
    the shared block with its exact length.

    Returns (machine type, small-block pages, device sections).

    Raises:
        PromotionStreamError: any check failed; the message names the block, page or
            section and what to do.
    """
    p = _parse(data, what)
    pages, devices = p.pages, p.devices
    if p.config is None:
        raise _fail(f"the {what} has no configuration section", "resync the replica")
    if _CAPABILITY not in p.config.capabilities:
        raise _fail(
            f"the {what} does not declare {_CAPABILITY} (capabilities "
            f"{list(p.config.capabilities)}): the shadow would expect the shared RAM in it",
            "capture device state with migrate-set-capabilities x-ignore-shared=true")
    if machine_type is not None and p.config.machine_type != machine_type:
        raise _fail(
            f"the {what} is for machine type {p.config.machine_type!r}, the shadow QEMU runs "
            f"{machine_type!r} (QEMU refuses the mismatch)",
            "start the shadow with the primary's machine type")
    if p.mem is None or p.ram_sections != 1:
        raise _fail(f"the {what} has {p.ram_sections} RAM sections and "
                    f"{'a' if p.mem else 'no'} block list; expected one of each",
                    "resync the replica")
    declared = {b.idstr: b.used_length for b in p.mem.blocks}
    table = {b.idstr: b.length for b in replica.blocks}
    if declared != table:
        raise _fail(f"the {what} declares blocks {_fmt(declared)}, the replica holds "
                    f"{_fmt(table)}", "resync the replica (the RAM layout changed)")
    ps = p.page_size
    small_pages = 0
    for b in replica.blocks:
        got = pages.get(b.idstr, {})
        if not b.flags & BlockFlags.SMALL:
            if got:
                raise _fail(f"the {what} carries {len(got)} pages of the shared block "
                            f"{b.idstr!r}", "capture device state with x-ignore-shared")
            continue
        want = replica.small_block(b.idstr)
        for off in range(0, b.length, ps):
            page = got.get(off)
            if page is None:
                raise _fail(f"the {what} has no page at offset {off:#x} of small block "
                            f"{b.idstr!r}", "resync the replica")
            ref = want[off : off + ps]
            loaded = page if len(page) == ps else page * ps  # a ZERO record: its fill byte
            if loaded != ref:
                raise _fail(f"page {off:#x} of small block {b.idstr!r} in the {what} differs "
                            "from the replica's (the epoch's SMALL_BLOCK frames and device "
                            "state disagree)", "resync the replica")
            small_pages += 1
    if not devices or not p.eof:
        raise _fail(f"the {what} has {len(devices)} device sections and "
                    f"{'an' if p.eof else 'no'} EOF", "resync the replica")
    if target is not None:
        have = {t.idstr: t for t in target}
        extra = sorted(set(have) - set(table))
        if extra:
            raise _fail(f"the shadow QEMU has RAM blocks {extra} that the primary's block table "
                        f"lacks ({sorted(table)}): their contents would not be restored",
                        "launch the shadow with exactly the primary's devices and firmware")
        for b in replica.blocks:
            t = have.get(b.idstr)
            if t is None:
                raise _fail(f"the shadow QEMU has no RAM block {b.idstr!r} (it has "
                            f"{sorted(have)})", "launch the shadow with the primary's devices")
            exact = not b.flags & BlockFlags.SMALL
            if (exact and t.used_length != b.length) or b.length > t.max_length:
                raise _fail(f"RAM block {b.idstr!r} has {b.length} bytes in the replica, the "
                            f"shadow QEMU {t.used_length} (max {t.max_length})",
                            "launch the shadow with the primary's memory size and devices")
    return p.config.machine_type, small_pages, len(devices)


def _fmt(blocks: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{k}:{v:#x}" for k, v in blocks.items()) + "}"


def _sections_of(blob: bytes) -> list[DeviceSection]:
    """The device sections of a QEMU_SECTIONS blob (FULL sections ending in EOF)."""
    w = StreamWriter(ignore_shared=True)
    probe = w.write(Header(QEMU_VM_FILE_VERSION)) + w.write(Configuration("probe")) + blob
    parser = StreamParser()
    try:
        parser.receive_data(probe)
        parser.receive_data(b"")
        events = parser.events()
    except StreamFormatError as exc:
        raise _fail(f"the committed device sections do not parse ({exc})",
                    "resync the replica") from None
    if not any(isinstance(e, Eof) for e in events) or not any(
            isinstance(e, EndOfStream) for e in events):
        raise _fail("the committed device sections do not end with EOF", "resync the replica")
    other = [type(e).__name__ for e in events
             if not isinstance(e, Header | Configuration | DeviceSection | Eof | EndOfStream)]
    if other:
        raise _fail(f"the committed device state holds {sorted(set(other))} besides device "
                    "sections", "store QEMU_SECTIONS blobs as FULL sections + EOF only")
    return [e for e in events if isinstance(e, DeviceSection)]


def _ram_sid(sections: Sequence[DeviceSection]) -> int:
    used = {s.section_id for s in sections}
    sid = RAM_SECTION_ID
    while sid in used:
        sid = (sid + 1) % _MAX_SECTION_ID
    return sid


def _compose_prefix(replica: ReplicaView, machine_type: str, sid: int, page_size: int,
                    small: Mapping[str, bytes]) -> bytes:
    """Header, configuration and the whole RAM section (block list, small-block pages)."""
    w = StreamWriter(ignore_shared=True)
    caps = Subsection("configuration/capabilities", 1, encode_capabilities((_CAPABILITY,)))
    out = [
        w.write(Header(QEMU_VM_FILE_VERSION)),
        w.write(Configuration(machine_type, (caps,))),
        w.write(SectionStart(sid, "ram", 0, RAM_SECTION_VERSION)),
        w.write(RamMemSize(sum(b.length for b in replica.blocks),
                           tuple(RamBlockDecl(b.idstr, b.length, 0) for b in replica.blocks))),
    ]
    zero = bytes(page_size)
    for b in replica.blocks:
        if not b.flags & BlockFlags.SMALL:
            continue
        content = small[b.idstr]
        payload = bytearray()
        records = []
        for off in range(0, b.length, page_size):
            page = content[off : off + page_size]
            flags = RamFlag.ZERO if page == zero else RamFlag.PAGE
            if off:
                flags |= RamFlag.CONTINUE
            records.append((flags, off, b.idstr, len(payload)))
            payload += b"\x00" if flags & RamFlag.ZERO else page
        out.append(w.write(RamRecords(sid, bytes(payload), records, page_size)))
    out += [w.write(RamEos(sid)), w.write(SectionFooter(sid))]
    return b"".join(out)


def _compose_devices(sections: Sequence[DeviceSection], page_size: int) -> bytes:
    """The device sections, EOF and the VMDESCRIPTION listing them."""
    w = StreamWriter(ignore_shared=True)
    out = [w.write(s) for s in sections]
    out.append(w.write(Eof()))
    desc = {
        "page_size": page_size,
        "devices": [{"name": s.idstr, "instance_id": s.instance_id, "vmsd_name": s.idstr,
                     "version": s.version_id, "fields": []} for s in sections],
    }
    out.append(w.write(VmDescription(json.dumps(desc, separators=(",", ":")).encode())))
    return b"".join(out)


def _small_contents(replica: ReplicaView) -> dict[str, bytes]:
    return {b.idstr: replica.small_block(b.idstr) for b in replica.blocks
            if b.flags & BlockFlags.SMALL}


@dataclass(frozen=True, slots=True)
class _Prefix:
    """A composed and fully checked RAM prefix, and what it was composed from."""

    key: tuple[object, ...]
    small: dict[str, bytes]
    data: bytes
    small_pages: int


class PromotionBuilder:
    """:func:`build_promotion_stream` that remembers the last checked RAM prefix.

    Between two epochs a composed (QEMU_SECTIONS) promotion stream usually differs only
    in its device sections: the small blocks (firmware, option ROMs, ACPI tables) rarely
    change. The builder keeps the prefix (header, configuration, RAM section with every
    small-block page) of the last stream it built and checked in full; when the next
    epoch has the same block table, machine type, RAM section id and byte-identical
    small blocks, it reuses that prefix and composes only the device part (which was
    parsed and checked from the committed blob). Anything else is a full build and check.
    A standby's prepare at commit — inside a switchover's downtime for the final epoch —
    then skips re-composing and re-parsing ~200 KB of unchanged pages.
    """

    def __init__(self) -> None:
        self._prefix: _Prefix | None = None
        #: Builds that reused the prefix / composed and checked everything (for tests).
        self.hits = 0
        self.misses = 0

    def build(self, replica: ReplicaView, *, machine_type: str | None = None,
              target: Sequence[TargetBlock] | None = None,
              page_size: int = 4096) -> PromotionStream:
        """As :func:`build_promotion_stream` (same arguments, result and errors)."""
        dev = replica.device_state
        if (dev is None or replica.committed_epoch == 0
                or dev.format is not DeviceStateFormat.QEMU_SECTIONS):
            return build_promotion_stream(replica, machine_type=machine_type, target=target,
                                          page_size=page_size)
        chosen = _machine_type(replica, machine_type)
        sections = _sections_of(dev.data)
        sid = _ram_sid(sections)
        small = _small_contents(replica)
        key = (tuple(replica.blocks), chosen, sid, page_size,
               None if target is None else tuple(target))
        cached = self._prefix
        if cached is not None and cached.key == key and cached.small == small and sections:
            self.hits += 1
            data = cached.data + _compose_devices(sections, page_size)
            return PromotionStream(
                data=data, generation=replica.generation, epoch=replica.committed_epoch,
                format=dev.format, machine_type=chosen, small_pages=cached.small_pages,
                device_sections=len(sections), replayed=False)
        self.misses += 1
        prefix = _compose_prefix(replica, chosen, sid, page_size, small)
        data = prefix + _compose_devices(sections, page_size)
        mt, pages, ndev = check_promotion_stream(data, replica, machine_type=chosen,
                                                 target=target)
        self._prefix = _Prefix(key, small, prefix, pages)
        return PromotionStream(data=data, generation=replica.generation,
                               epoch=replica.committed_epoch, format=dev.format,
                               machine_type=mt, small_pages=pages, device_sections=ndev,
                               replayed=False)


def _machine_type(replica: ReplicaView, machine_type: str | None) -> str:
    mt_replica = replica.machine_type
    if mt_replica is not None and machine_type is not None and mt_replica != machine_type:
        raise _fail(f"the primary ran machine type {mt_replica!r}, the shadow QEMU runs "
                    f"{machine_type!r} (QEMU refuses the mismatch)",
                    "start the shadow with the primary's machine type")
    chosen = mt_replica or machine_type
    if chosen is None:
        raise _fail("the machine type is unknown (the replica was reset without one and "
                    "no shadow machine type was given)",
                    "pass machine_type= (e.g. the shadow QEMU's, 'pc-i440fx-7.2')")
    return chosen


def build_promotion_stream(
    replica: ReplicaView,
    *,
    machine_type: str | None = None,
    target: Sequence[TargetBlock] | None = None,
    page_size: int = 4096,
) -> PromotionStream:
    """Build and validate the promotion stream of ``replica``'s committed epoch.

    ``machine_type`` is the shadow QEMU's (e.g. ``pc-i440fx-7.2``): for QEMU_SECTIONS it
    is used when the replica does not know the primary's, and must match it when it does;
    for IGNORE_SHARED_STREAM it must match the stream's. ``target`` is the shadow QEMU's
    RAM blocks (checked as in :func:`check_promotion_stream`). ``page_size`` is QEMU's
    target page size for composed streams.

    Raises:
        PromotionStreamError: the replica holds no committed epoch; the machine type is
            unknown or differs; the device state does not parse, lacks x-ignore-shared or
            disagrees with the replica's small blocks; the shadow's blocks do not fit.
    """
    dev = replica.device_state
    if replica.committed_epoch == 0 or dev is None:
        raise _fail("the replica holds no committed epoch",
                    "wait until the source's first full epoch is committed")
    if dev.format is DeviceStateFormat.IGNORE_SHARED_STREAM:
        mt, pages, ndev = check_promotion_stream(
            dev.data, replica, machine_type=machine_type, target=target,
            what="stored x-ignore-shared stream")
        data = dev.data
        replayed = True
    else:
        chosen = _machine_type(replica, machine_type)
        sections = _sections_of(dev.data)
        prefix = _compose_prefix(replica, chosen, _ram_sid(sections), page_size,
                                 _small_contents(replica))
        data = prefix + _compose_devices(sections, page_size)
        mt, pages, ndev = check_promotion_stream(data, replica, machine_type=chosen,
                                                 target=target)
        replayed = False
    return PromotionStream(data=data, generation=replica.generation,
                           epoch=replica.committed_epoch, format=dev.format, machine_type=mt,
                           small_pages=pages, device_sections=ndev, replayed=replayed)
