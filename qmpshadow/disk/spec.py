"""``[[disks]]`` of a VM spec: parsing and the QEMU arguments of each role.

Each disk is a raw image attached as an IDE disk (``ide.<n//2>``, unit ``n%2``) through a
named block node ``id`` (the node the dirty bitmaps and backup jobs work on)::

    [[disks]]
    id = "disk0"                          # block node name (a QEMU id)
    path = "/var/lib/vm/disk0.raw"        # the primary's image
    shadow_path = "/var/lib/shadow/disk0.raw"  # the shadow's copy (mode = "copy")
    mode = "copy"                         # or "shared": both use ``path``, no copy

See docs/disks.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qmpshadow.errors import ConfigError

DiskMode = Literal["copy", "shared"]
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_KEYS = frozenset({"id", "path", "shadow_path", "mode"})
#: The pc machine's IDE controller has two buses of two units.
MAX_DISKS = 4


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One disk. Raises ConfigError for a bad id, mode or missing shadow_path."""

    id: str
    path: Path
    shadow_path: Path | None = None
    mode: DiskMode = "copy"

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.id) or len(self.id) > 32:
            raise ConfigError(f"disks.id: expected a QEMU id (a letter, then letters, "
                              f"digits, '-', '.', '_'; at most 32), got {self.id!r}")
        if self.mode not in ("copy", "shared"):
            raise ConfigError(f"disks.mode of {self.id!r}: expected 'copy' or 'shared', "
                              f"got {self.mode!r}")
        if self.mode == "copy" and self.shadow_path is None:
            raise ConfigError(f"disks.shadow_path of {self.id!r}: mode 'copy' needs the "
                              "shadow's image path; add shadow_path or set mode = 'shared'")
        if self.shadow_path is not None and self.mode == "copy" and (
                os.path.abspath(self.shadow_path) == os.path.abspath(self.path)):
            raise ConfigError(f"disks.shadow_path of {self.id!r} is the primary's image; "
                              "expected a separate file (or mode = 'shared')")

    def image(self, role: Literal["primary", "shadow"]) -> Path:
        """The image file QEMU of ``role`` opens."""
        if role == "shadow" and self.mode == "copy" and self.shadow_path is not None:
            return self.shadow_path
        return self.path


def disks_from_list(raw: object, base_dir: Path | None) -> tuple[DiskSpec, ...]:
    """Parse the ``disks`` array of tables. Raises ConfigError naming the key."""
    if not isinstance(raw, list):
        raise ConfigError(f"disks: expected an array of tables ([[disks]]), got "
                          f"{type(raw).__name__}")
    if len(raw) > MAX_DISKS:
        raise ConfigError(f"disks: at most {MAX_DISKS} (IDE), got {len(raw)}")
    out = []
    for i, d in enumerate(raw):
        if not isinstance(d, Mapping):
            raise ConfigError(f"disks[{i}]: expected a table with id and path, got {d!r}")
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise ConfigError(f"disks[{i}]: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
        kw: dict[str, Any] = {}
        for key in ("id", "path"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise ConfigError(f"disks[{i}].{key}: expected a non-empty string, got "
                                  f"{d.get(key)!r}")
        kw["id"] = d["id"]
        for key in ("path", "shadow_path"):
            if key in d:
                if not isinstance(d[key], str):
                    raise ConfigError(f"disks[{i}].{key}: expected a path string")
                p = Path(d[key]).expanduser()
                kw[key] = p if base_dir is None or p.is_absolute() else base_dir / p
        if "mode" in d:
            kw["mode"] = d["mode"]
        out.append(DiskSpec(**kw))
    ids = [d.id for d in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"disks: ids must be unique, got {ids}")
    return tuple(out)


def disk_argv(disks: tuple[DiskSpec, ...], role: Literal["primary", "shadow"]) -> list[str]:
    """-blockdev/-device arguments for ``role`` (raw images, IDE disks)."""
    argv: list[str] = []
    for n, d in enumerate(disks):
        fname = os.fspath(d.image(role)).replace(",", ",,")
        argv += ["-blockdev", f"file,node-name={d.id}-file,filename={fname}",
                 "-blockdev", f"raw,node-name={d.id},file={d.id}-file",
                 "-device", f"ide-hd,drive={d.id},bus=ide.{n // 2},unit={n % 2}"]
    return argv


def disk_sizes(disks: tuple[DiskSpec, ...]) -> list[int]:
    """Size in bytes of each primary image. Raises ConfigError when one is missing."""
    sizes = []
    for d in disks:
        try:
            sizes.append(os.stat(d.path).st_size)
        except OSError as exc:
            raise ConfigError(f"disk {d.id!r}: cannot stat {str(d.path)!r}: {exc.strerror}; "
                              "create the raw image first") from None
    return sizes
