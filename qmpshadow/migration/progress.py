"""``query-migrate`` read as typed progress, and the final statistics of a migration.

Sans-I/O. QEMU's reply is peer data: every member is optional and wrongly typed members
read as absent rather than raising, so a newer or older QEMU degrades the display, never
the migration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: Source states during which a migration is under way and can still be cancelled with
#: the source resuming (QEMU restarts the vCPUs itself if they ran before).
PRECOPY_STATES = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})
#: States after the switch to postcopy: the destination runs the guest, the source holds
#: pages it has not sent yet; neither side alone has the whole guest.
POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
#: States in which nothing is in flight.
SETTLED_STATES = frozenset({"none", "completed", "failed", "cancelled"})


def _int(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _float(doc: Mapping[str, Any], key: str) -> float | None:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class Progress:
    """One ``query-migrate`` answer of the source.

    ``transferred``/``remaining``/``total`` are RAM bytes (``remaining`` is what is dirty
    now, ``total`` the guest's RAM); ``dirty_rate`` is in bytes/s (QEMU's
    dirty-pages-rate × page size); ``passes`` is QEMU's dirty-sync-count (1 during the
    first pass over RAM).
    """

    status: str
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate_pages: int = 0
    normal_pages: int = 0
    normal_bytes: int = 0
    dirty_rate: float = 0.0
    passes: int = 0
    mbps: float = 0.0
    page_size: int = 4096
    multifd_bytes: int = 0
    postcopy_requests: int = 0
    throttle_percent: int | None = None
    error: str | None = None

    @classmethod
    def from_query(cls, info: Mapping[str, Any]) -> Progress:
        """Read a ``query-migrate`` reply (missing/mistyped members read as absent)."""
        status = info.get("status")
        ram = info.get("ram")
        ram = ram if isinstance(ram, Mapping) else {}
        page_size = _int(ram, "page-size") or 4096
        error = info.get("error-desc")
        return cls(
            status=status if isinstance(status, str) else "none",
            total_time_ms=_int(info, "total-time"),
            setup_time_ms=_int(info, "setup-time"),
            downtime_ms=_int(info, "downtime"),
            expected_downtime_ms=_int(info, "expected-downtime"),
            transferred=_int(ram, "transferred") or 0,
            remaining=_int(ram, "remaining") or 0,
            total=_int(ram, "total") or 0,
            duplicate_pages=_int(ram, "duplicate") or 0,
            normal_pages=_int(ram, "normal") or 0,
            normal_bytes=_int(ram, "normal-bytes") or 0,
            dirty_rate=(_float(ram, "dirty-pages-rate") or 0.0) * page_size,
            passes=_int(ram, "dirty-sync-count") or 0,
            mbps=_float(ram, "mbps") or 0.0,
            page_size=page_size,
            multifd_bytes=_int(ram, "multifd-bytes") or 0,
            postcopy_requests=_int(ram, "postcopy-requests") or 0,
            throttle_percent=_int(info, "cpu-throttle-percentage"),
            error=error if isinstance(error, str) else None,
        )

    @property
    def moved(self) -> tuple[int, int, int, str]:
        """What changes while bytes flow (for stall detection)."""
        return (self.transferred, self.multifd_bytes, self.passes, self.status)

    @property
    def fraction(self) -> float:
        """Rough completion of the current pass, 0..1 (transferred vs transferred+remaining
        in the first pass; 1 - remaining/total afterwards)."""
        if self.status == "completed":
            return 1.0
        if self.total <= 0:
            return 0.0
        return max(0.0, min(1.0, 1.0 - self.remaining / self.total))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3f} {unit}"
        n /= 1024
    return f"{n:.3f} GiB"


def describe(p: Progress) -> str:
    """One line for logs: status, transferred, remaining, dirty rate, pass, downtime."""
    parts = [p.status, f"transferred {_fmt_bytes(p.transferred)}",
             f"remaining {_fmt_bytes(p.remaining)}",
             f"dirty {_fmt_bytes(p.dirty_rate)}/s", f"pass {p.passes}"]
    if p.expected_downtime_ms is not None:
        parts.append(f"expected downtime {p.expected_downtime_ms} ms")
    if p.throttle_percent:
        parts.append(f"throttle {p.throttle_percent}%")
    return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """Final statistics, in the spirit of ``virsh domjobinfo``.

    ``total_time_ms``, ``downtime_ms`` and ``setup_time_ms`` are QEMU's own (the source's
    view: ``downtime`` ends when the source sent the last byte). ``guest_pause_ms`` is what
    the guest saw: from the source's STOP event to the destination's RESUME event (QMP
    event timestamps, both from this host's clock), so it includes loading the last bytes
    on the destination and qmpshadow's ``cont``. ``wall_time_ms`` is from the ``migrate``
    command to the destination running. ``resumed_at`` is the destination's RESUME event
    timestamp (seconds since the epoch, this host's clock; None if not seen).
    """

    status: str
    total_time_ms: int | None
    downtime_ms: int | None
    setup_time_ms: int | None
    guest_pause_ms: float | None
    wall_time_ms: float
    transferred: int
    total: int
    remaining: int
    normal_pages: int
    normal_bytes: int
    duplicate_pages: int
    passes: int
    mbps: float
    page_size: int
    multifd_bytes: int
    postcopy: bool
    postcopy_requests: int
    uri: str
    source_after: str
    destination: dict[str, Any]
    recording: dict[str, Any] | None = None
    resumed_at: float | None = None

    @classmethod
    def build(cls, final: Progress, *, guest_pause_ms: float | None, wall_time_ms: float,
              postcopy: bool, uri: str, source_after: str,
              destination: dict[str, Any],
              recording: dict[str, Any] | None = None,
              resumed_at: float | None = None) -> MigrationStats:
        """Combine the source's final ``query-migrate`` with what qmpshadow measured."""
        return cls(
            status=final.status, total_time_ms=final.total_time_ms,
            downtime_ms=final.downtime_ms, setup_time_ms=final.setup_time_ms,
            guest_pause_ms=guest_pause_ms, wall_time_ms=wall_time_ms,
            transferred=final.transferred, total=final.total, remaining=final.remaining,
            normal_pages=final.normal_pages, normal_bytes=final.normal_bytes,
            duplicate_pages=final.duplicate_pages, passes=final.passes, mbps=final.mbps,
            page_size=final.page_size, multifd_bytes=final.multifd_bytes,
            postcopy=postcopy, postcopy_requests=final.postcopy_requests, uri=uri,
            source_after=source_after, destination=destination, recording=recording,
            resumed_at=resumed_at)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``--json``)."""
        return asdict(self)

    def format(self) -> str:
        """Human report, one ``Key: value`` per line like ``virsh domjobinfo``."""
        def ms(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.0f} ms"
        rows = [
            ("Job type", "Completed" if self.status == "completed" else self.status),
            ("Operation", "Outgoing migration" + (" (postcopy)" if self.postcopy else "")),
            ("Time elapsed", ms(self.total_time_ms)),
            ("Time to destination running", ms(self.wall_time_ms)),
            ("Setup time", ms(self.setup_time_ms)),
            ("Downtime (QEMU)", ms(self.downtime_ms)),
            ("Guest paused (STOP→RESUME)", ms(self.guest_pause_ms)),
            ("Data processed", _fmt_bytes(self.transferred)),
            ("Data remaining", _fmt_bytes(self.remaining)),
            ("Memory total", _fmt_bytes(self.total)),
            ("Memory bandwidth", f"{self.mbps:.1f} Mbit/s" if self.mbps else "n/a"),
            ("Passes over RAM", str(self.passes)),
            ("Normal pages", f"{self.normal_pages} ({_fmt_bytes(self.normal_bytes)})"),
            ("Zero pages", str(self.duplicate_pages)),
            ("Page size", f"{self.page_size} B"),
        ]
        if self.multifd_bytes:
            rows.append(("Multifd data", _fmt_bytes(self.multifd_bytes)))
        if self.postcopy:
            rows.append(("Postcopy requests", str(self.postcopy_requests)))
        rows.append(("URI", self.uri))
        dest = self.destination
        rows.append(("Destination", f"pid {dest.get('pid')}, QMP {dest.get('qmp')}"
                     + (f", netns {dest['netns']}" if dest.get("netns") else "")))
        rows.append(("Source", "left paused (postmigrate)" if self.source_after == "pause"
                     else "quit"))
        if self.recording:
            rec = self.recording
            rows.append(("Recorded", f"{rec.get('forward_bytes')} bytes to "
                         f"{rec.get('file')} (return path {rec.get('return_bytes')} bytes)"))
        width = max(len(k) for k, _ in rows) + 2
        return "\n".join(f"{k + ':':<{width}}{v}" for k, v in rows)
