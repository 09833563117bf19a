"""``qmpshadow stream diff A B``: what differs between two migration streams, or between two
COLO checkpoints of one recorded session.

A side is ``FILE`` (the state the stream leaves: a precopy stream's end, or a COLO
recording's last complete checkpoint) or ``FILE@checkpointN`` (a COLO recording after its
N-th checkpoint; ``@checkpoint0`` is the state after the initial stream). Each side is
parsed with :mod:`qmpshadow.migstream` into a page map (an xxh3-64 digest of every page's
last contents, per RAM block) and the device sections in force at that point; device payloads
are decoded with the session's vmdesc (COLO checkpoints carry none: the initial stream's
is used) by :mod:`qmpshadow.migstream.vmstate`.

Streams with XBZRLE pages need the previous contents of a page to decode it; for them the
whole RAM image is kept in memory (else only 8 bytes per page).
"""

from __future__ import annotations

import array
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..errors import ConfigError, StreamFormatError
from ..migstream import StreamParser
from ..migstream.constants import RamFlag
from ..migstream.events import (
    ColoVmstate,
    Configuration,
    DeviceSection,
    EndOfStream,
    Event,
    RamMemSize,
    RamRecords,
    RamXbzrle,
    VmDescription,
    _NeedData,
)
from ..migstream.image import RamImage
from ..migstream.vmstate import (
    FieldChange,
    changed_byte_ranges,
    decode_device,
    device_descriptions,
    diff_fields,
    format_value,
)

CHUNK = 4 << 20
_REF_RE = re.compile(r"(.*)@checkpoint(\d+)\Z")
ProgressFn = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class StreamRef:
    """One side of a diff: a file and optionally a COLO checkpoint (0 = initial state)."""

    path: str
    checkpoint: int | None = None

    def __str__(self) -> str:
        return self.path if self.checkpoint is None else f"{self.path}@checkpoint{self.checkpoint}"


def parse_ref(text: str) -> StreamRef:
    """``FILE`` or ``FILE@checkpointN``.

    Raises:
        ConfigError: empty path.
    """
    m = _REF_RE.match(text)
    path, cp = (m.group(1), int(m.group(2))) if m else (text, None)
    if not path:
        raise ConfigError(f"expected FILE or FILE@checkpointN, got {text!r}")
    return StreamRef(path, cp)


@dataclass
class _Block:
    idstr: str
    length: int
    digests: array.array  # type: ignore[type-arg]
    present: bytearray

    def copy(self) -> _Block:
        return _Block(self.idstr, self.length, array.array("Q", self.digests),
                      bytearray(self.present))


@dataclass
class StreamState:
    """What one side holds: per-block page digests and the device sections in force."""

    ref: StreamRef
    page_size: int = 4096
    machine_type: str | None = None
    capabilities: tuple[str, ...] = ()
    blocks: dict[str, _Block] = field(default_factory=dict)
    devices: list[DeviceSection] = field(default_factory=list)
    vmdesc: dict[str, Any] | None = None
    checkpoint: int = 0  # COLO checkpoints applied (0: the initial stream)
    colo: bool = False
    note: str | None = None


class _NeedImage(Exception):
    """Internal: an XBZRLE page came; re-read keeping the RAM image."""


_ZERO_DIGESTS: dict[tuple[int, int], int] = {}


def _fill_digest(fill: int, page_size: int) -> int:
    key = (fill, page_size)
    d = _ZERO_DIGESTS.get(key)
    if d is None:
        d = _ZERO_DIGESTS[key] = xxhash.xxh3_64_intdigest(bytes([fill]) * page_size)
    return d


class _Collector:
    def __init__(self, ref: StreamRef, keep_image: bool) -> None:
        self.state = StreamState(ref)
        self.image = RamImage() if keep_image else None

    def feed(self, ev: Event) -> None:
        st = self.state
        if isinstance(ev, RamRecords):
            ps = ev.page_size
            data = ev.data
            digest = xxhash.xxh3_64_intdigest
            for flags, offset, name, pos in ev.records:
                blk = st.blocks[name]
                i = offset // ps
                if flags & RamFlag.PAGE:
                    blk.digests[i] = digest(data[pos:pos + ps])
                else:
                    blk.digests[i] = _fill_digest(data[pos], ps)
                blk.present[i] = 1
            if self.image is not None:
                self.image.apply(ev)
        elif isinstance(ev, RamXbzrle):
            if self.image is None:
                raise _NeedImage
            self.image.apply(ev)
            blk = st.blocks[ev.block]
            i = ev.offset // st.page_size
            page = self.image.blocks[ev.block][ev.offset:ev.offset + st.page_size]
            blk.digests[i] = xxhash.xxh3_64_intdigest(page)
            blk.present[i] = 1
        elif isinstance(ev, RamMemSize):
            for b in ev.blocks:
                n = b.used_length // st.page_size
                st.blocks[b.idstr] = _Block(b.idstr, b.used_length, array.array("Q", bytes(8 * n)),
                                            bytearray(n))
            if self.image is not None:
                self.image.apply(ev)
        elif isinstance(ev, Configuration):
            st.machine_type = ev.machine_type
            st.capabilities = ev.capabilities
            if ev.target_page_bits:
                st.page_size = 1 << ev.target_page_bits
        elif isinstance(ev, DeviceSection):
            st.devices.append(ev)
        elif isinstance(ev, VmDescription):
            try:
                st.vmdesc = ev.parsed()
            except ValueError:
                st.vmdesc = None
        elif isinstance(ev, ColoVmstate):
            st.colo = True
            st.checkpoint = ev.checkpoint
            st.devices = list(ev.sections)

    def snapshot(self) -> StreamState:
        st = self.state
        return StreamState(st.ref, st.page_size, st.machine_type, st.capabilities,
                           {k: b.copy() for k, b in st.blocks.items()}, list(st.devices),
                           st.vmdesc, st.checkpoint, st.colo)


def load_states(path: str, checkpoints: Iterable[int | None], *,
                progress: ProgressFn | None = None) -> dict[int | None, StreamState]:
    """States of ``path`` at the given checkpoints (None: the end state), in one pass.

    Raises:
        ConfigError: the file cannot be read, or holds fewer checkpoints than asked for.
        StreamFormatError: the stream is malformed before every asked state was reached.
    """
    wanted = set(checkpoints)
    try:
        return _load(path, wanted, keep_image=False, progress=progress)
    except _NeedImage:
        return _load(path, wanted, keep_image=True, progress=progress)


def _load(path: str, wanted: set[int | None], *, keep_image: bool,
          progress: ProgressFn | None) -> dict[int | None, StreamState]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigError(f"cannot open stream file {path!r}: {exc.strerror}") from None
    parser = StreamParser()
    col = _Collector(StreamRef(path), keep_image)
    out: dict[int | None, StreamState] = {}
    last_complete: StreamState | None = None
    done = 0
    error: StreamFormatError | None = None
    ended = False

    def take(ref_cp: int | None, snap: StreamState) -> None:
        snap.ref = StreamRef(path, ref_cp)
        out[ref_cp] = snap

    with f:
        total = os.fstat(f.fileno()).st_size
        try:
            while not ended:
                chunk = f.read(CHUNK)
                parser.receive_data(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
                while True:
                    ev = parser.next_event()
                    if isinstance(ev, _NeedData):
                        break
                    col.feed(ev)
                    if isinstance(ev, VmDescription):
                        last_complete = col.snapshot()
                        if 0 in wanted:
                            take(0, col.snapshot())
                    elif isinstance(ev, ColoVmstate):
                        last_complete = col.snapshot()
                        if ev.checkpoint in wanted:
                            take(ev.checkpoint, col.snapshot())
                    elif isinstance(ev, EndOfStream):
                        ended = True
                        if last_complete is None:
                            last_complete = col.snapshot()
                if not chunk:
                    ended = True
                if wanted <= set(out) - {None} and None not in wanted:
                    break
        except StreamFormatError as exc:
            error = exc
    missing = sorted(cp for cp in wanted if cp is not None and cp not in out)
    if missing:
        have = col.state.checkpoint
        if error is not None:
            raise error
        raise ConfigError(
            f"{path}: checkpoint {missing[0]} asked for, but the recording holds "
            + (f"{have} complete COLO checkpoint(s)" if col.state.colo
               else "a plain (non-COLO) stream: use FILE without @checkpointN"))
    if None in wanted:
        if last_complete is None:
            if error is not None:
                raise error
            raise StreamFormatError("the stream ends before its first complete state",
                                    offset=done, section=None)
        if error is not None:
            last_complete.note = (f"the recording ends with a damaged or truncated part "
                                  f"({error}); compared the last complete state")
        take(None, last_complete)
    return out


# ---------------------------------------------------------------------------- diff


@dataclass
class BlockDiff:
    """Pages of one RAM block that differ (``ranges`` in bytes, merged, [start, end))."""

    idstr: str
    length_a: int | None
    length_b: int | None
    changed: int = 0
    only_a: int = 0
    only_b: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def as_dict(self, max_ranges: int | None) -> dict[str, Any]:
        """JSON-ready (at most ``max_ranges`` ranges, None: all)."""
        rng = self.ranges if max_ranges is None else self.ranges[:max_ranges]
        return {"block": self.idstr, "length_a": self.length_a, "length_b": self.length_b,
                "changed_pages": self.changed, "only_in_a": self.only_a,
                "only_in_b": self.only_b, "ranges": [list(r) for r in rng],
                "ranges_total": len(self.ranges)}


@dataclass
class DeviceDiff:
    """One device section: ``status`` is same, changed, only-in-a, only-in-b, or raw
    (not decodable with the vmdesc: ``raw_ranges`` are the differing payload bytes)."""

    name: str
    instance_id: int
    status: str
    changes: list[FieldChange] = field(default_factory=list)
    raw_ranges: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        doc: dict[str, Any] = {"device": self.name, "instance_id": self.instance_id,
                               "status": self.status,
                               "changes": [c.as_dict() for c in self.changes]}
        if self.status == "raw":
            doc["raw_ranges"] = [list(r) for r in self.raw_ranges]
            doc["error"] = self.error
        return doc


@dataclass
class StreamDiff:
    """The whole comparison."""

    a: StreamState
    b: StreamState
    blocks: list[BlockDiff]
    devices: list[DeviceDiff]

    @property
    def identical(self) -> bool:
        """True when no page and no device differs."""
        return not any(b.changed or b.only_a or b.only_b or b.length_a != b.length_b
                       for b in self.blocks) and all(d.status == "same" for d in self.devices)

    def as_dict(self, max_ranges: int | None = None) -> dict[str, Any]:
        """The ``stream diff --json`` document."""
        def side(s: StreamState) -> dict[str, Any]:
            return {"ref": str(s.ref), "file": s.ref.path, "checkpoint": s.ref.checkpoint,
                    "colo": s.colo, "checkpoints_applied": s.checkpoint,
                    "machine_type": s.machine_type, "capabilities": list(s.capabilities),
                    "vmdesc": s.vmdesc is not None, "note": s.note}
        return {"a": side(self.a), "b": side(self.b), "identical": self.identical,
                "page_size": self.b.page_size,
                "ram": [b.as_dict(max_ranges) for b in self.blocks],
                "changed_pages": sum(b.changed for b in self.blocks),
                "devices": [d.as_dict() for d in self.devices if d.status != "same"],
                "devices_compared": len(self.devices),
                "devices_changed": sum(d.status != "same" for d in self.devices)}


def _block_diff(idstr: str, a: _Block | None, b: _Block | None, page_size: int) -> BlockDiff:
    out = BlockDiff(idstr, a.length if a else None, b.length if b else None)
    if a is None or b is None:
        present = (a or b).present if (a or b) else bytearray()  # type: ignore[union-attr]
        n = present.count(1)
        if a is None:
            out.only_b = n
        else:
            out.only_a = n
        return out
    n = min(len(a.present), len(b.present))
    da, db, pa, pb = a.digests, b.digests, a.present, b.present
    start = -1
    for i in range(n):
        differs = False
        if pa[i] and pb[i]:
            if da[i] != db[i]:
                out.changed += 1
                differs = True
        elif pa[i]:
            out.only_a += 1
            differs = True
        elif pb[i]:
            out.only_b += 1
            differs = True
        if differs:
            if start < 0:
                start = i
        elif start >= 0:
            out.ranges.append((start * page_size, i * page_size))
            start = -1
    if start >= 0:
        out.ranges.append((start * page_size, n * page_size))
    return out


def _descs(state: StreamState) -> Mapping[tuple[str, int], Mapping[str, Any]] | None:
    if state.vmdesc is None:
        return None
    try:
        return device_descriptions(state.vmdesc)
    except StreamFormatError:
        return None


def diff_states(a: StreamState, b: StreamState) -> StreamDiff:
    """Compare two states page by page and device field by device field."""
    ps = b.page_size
    names = list(a.blocks) + [k for k in b.blocks if k not in a.blocks]
    blocks = [_block_diff(k, a.blocks.get(k), b.blocks.get(k), ps) for k in names]
    desc_a, desc_b = _descs(a), _descs(b)
    devs_a = {(s.idstr, s.instance_id): s for s in a.devices}
    devs_b = {(s.idstr, s.instance_id): s for s in b.devices}
    keys = list(devs_a) + [k for k in devs_b if k not in devs_a]
    devices: list[DeviceDiff] = []
    for key in keys:
        sa, sb = devs_a.get(key), devs_b.get(key)
        if sa is None or sb is None:
            devices.append(DeviceDiff(key[0], key[1], "only-in-b" if sa is None else "only-in-a"))
            continue
        if sa.payload == sb.payload:
            devices.append(DeviceDiff(key[0], key[1], "same"))
            continue
        try:
            if desc_a is None or desc_b is None or key not in desc_a or key not in desc_b:
                raise StreamFormatError("no vmdesc describes this device", offset=0,
                                        section=key[0])
            fa = decode_device(desc_a[key], sa.payload)
            fb = decode_device(desc_b[key], sb.payload)
        except StreamFormatError as exc:
            devices.append(DeviceDiff(key[0], key[1], "raw",
                                      raw_ranges=changed_byte_ranges(sa.payload, sb.payload),
                                      error=str(exc)))
            continue
        changes = diff_fields(fa.fields, fb.fields)
        devices.append(DeviceDiff(key[0], key[1], "changed" if changes else "same", changes))
    return StreamDiff(a, b, blocks, devices)


def diff_refs(ref_a: StreamRef, ref_b: StreamRef, *, progress: ProgressFn | None = None
              ) -> StreamDiff:
    """Load both sides (one pass when they are the same file) and compare them.

    A COLO checkpoint without a vmdesc of its own borrows the session's initial one.

    Raises:
        ConfigError: a file cannot be read or lacks the asked checkpoint.
        StreamFormatError: a stream is malformed before the asked state.
    """
    if ref_a.path == ref_b.path:
        states = load_states(ref_a.path, {ref_a.checkpoint, ref_b.checkpoint},
                             progress=progress)
        sa, sb = states[ref_a.checkpoint], states[ref_b.checkpoint]
    else:
        sa = load_states(ref_a.path, {ref_a.checkpoint}, progress=progress)[ref_a.checkpoint]
        sb = load_states(ref_b.path, {ref_b.checkpoint}, progress=progress)[ref_b.checkpoint]
    return diff_states(sa, sb)


def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} MiB"


def format_human(diff: StreamDiff, *, max_ranges: int = 8) -> str:
    """Readable report (field changes: old → new)."""
    lines = [f"A: {diff.a.ref}", f"B: {diff.b.ref}"]
    for side in (diff.a, diff.b):
        if side.note:
            lines.append(f"note ({side.ref}): {side.note}")
    ps = diff.b.page_size
    total = sum(b.changed for b in diff.blocks)
    lines.append("")
    lines.append(f"RAM: {total} page(s) changed ({_fmt_size(total * ps)})")
    lines.append(f"  {'block':<28}{'pages':>9}{'changed':>9}{'only A':>8}{'only B':>8}")
    for b in diff.blocks:
        pages = (b.length_b or b.length_a or 0) // ps
        lines.append(f"  {b.idstr:<28}{pages:>9}{b.changed:>9}{b.only_a:>8}{b.only_b:>8}")
        if b.length_a != b.length_b and b.length_a and b.length_b:
            lines.append(f"      length differs: {b.length_a} vs {b.length_b}")
        for start, end in b.ranges[:max_ranges]:
            lines.append(f"      0x{start:x}-0x{end - 1:x} ({(end - start) // ps} pages)")
        if len(b.ranges) > max_ranges:
            lines.append(f"      ... {len(b.ranges) - max_ranges} more ranges (--json has all)")
    changed = [d for d in diff.devices if d.status != "same"]
    lines.append("")
    lines.append(f"devices: {len(diff.devices)} compared, {len(changed)} differ")
    for d in changed:
        head = f"  {d.name}/{d.instance_id}"
        if d.status in ("only-in-a", "only-in-b"):
            lines.append(f"{head}: only in {d.status[-1].upper()}")
            continue
        if d.status == "raw":
            rng = ", ".join(f"0x{s:x}-0x{e - 1:x}" for s, e in d.raw_ranges[:max_ranges])
            lines.append(f"{head}: payload bytes differ at {rng} (not decoded: {d.error})")
            continue
        lines.append(f"{head}: {len(d.changes)} field(s)")
        for c in d.changes:
            if isinstance(c.old, bytes) and isinstance(c.new, bytes):
                parts = []
                for s, e in changed_byte_ranges(c.old, c.new)[:4]:
                    parts.append(f"[{s}:{e}] {c.old[s:e][:16].hex()} → {c.new[s:e][:16].hex()}")
                lines.append(f"      {c.path}: " + "; ".join(parts))
            else:
                lines.append(f"      {c.path}: {format_value(c.old)} → {format_value(c.new)}")
    if diff.identical:
        lines.append("")
        lines.append("identical")
    return "\n".join(lines)
