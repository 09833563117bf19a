"""Sans-I/O decoder of device (vmstate) payloads, guided by the stream's vmdesc JSON.

A precopy stream ends with a VMDESCRIPTION: for every device section, the fields QEMU wrote,
in order, with name, type, size and nesting. This module walks a section's payload along
that description and yields typed :class:`Field` values with dotted paths (``env.regs[3]``,
``cpu/tsc_khz.tsc_khz``). It follows QEMU 7.2 (migration/vmstate.c, vmsd_desc_field_start /
vmstate_subsection_save; scripts/analyze-migration.py), with these rules:

- ``"array_len": N``: a compressed array, N elements each of ``size`` bytes (of the same
  struct when ``struct`` is given); ``"index": i``: one element of an uncompressed array,
  listed once per element. Paths get ``[i]``.
- ``"struct"``: a nested vmsd (its own ``fields`` and optional ``subsections``);
  ``tmp``/``vstruct`` fields carry their nested vmsd inline (``fields`` next to ``type``).
- Integer types (``int8`` .. ``uint64`` and their ``equal``/``le`` variants — ``le`` means
  "less or equal", the bytes are big-endian like every vmstate integer) decode to ints,
  ``bool`` to a bool, ``timer`` to the signed be64 expiry (-1: not armed); everything else
  (``buffer``, ``unused_buffer``, ``bitmap``, ``pci config``, ``float64``, ...) stays bytes.
  The size always comes from the description (QEMU's null-pointer marker is a one-byte
  "uint64").
- Subsections come after a vmsd's fields: ``0x05``, length-prefixed name, be32 version; one
  is taken while the name starts with the vmsd's name (QEMU's own test), and described by
  the ``subsections`` entry of that name.
- Paths are unique per device: a later field whose path repeats an earlier one (i8254 has
  a field named ``channels[0].next_transition_time`` besides the array ``channels``) gets
  ``#2``.

The vmdesc describes the stream it ends. COLO checkpoints carry none: decode them with the
initial stream's vmdesc of the same session. A section whose bytes do not fit the
description (e.g. a subsection that was not needed when the vmdesc was written) raises
:class:`~qmpshadow.errors.StreamFormatError`; callers then compare raw bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import StreamFormatError
from .constants import SectionType

Value = int | bool | bytes

_SIGNED = frozenset({"int8", "int16", "int32", "int64", "int32 equal", "int32 le",
                     "int64 equal", "timer"})
_UNSIGNED = frozenset({"uint8", "uint16", "uint32", "uint64", "uint32 equal",
                       "uint8 equal", "uint16 equal"})
_MAX_DEPTH = 32
_MAX_ARRAY = 1 << 20


@dataclass(frozen=True, slots=True)
class Field:
    """One decoded leaf field: ``path``, vmstate ``type``, position (``offset`` in the
    section payload, ``size``) and ``value`` (int, bool, or the raw bytes)."""

    path: str
    type: str
    offset: int
    size: int
    value: Value

    def json_value(self) -> int | bool | str:
        """The value for JSON: ints and bools as they are, bytes as hex."""
        return self.value.hex() if isinstance(self.value, bytes) else self.value


@dataclass(frozen=True, slots=True)
class DecodedDevice:
    """A device section decoded along its description."""

    name: str
    instance_id: int
    vmsd_name: str
    version: int
    fields: tuple[Field, ...]

    def values(self) -> dict[str, Value]:
        """``{path: value}`` in stream order."""
        return {f.path: f.value for f in self.fields}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: identity and ``{path: value}`` (bytes as hex)."""
        return {"name": self.name, "instance_id": self.instance_id,
                "vmsd_name": self.vmsd_name, "version": self.version,
                "fields": {f.path: f.json_value() for f in self.fields}}


def device_descriptions(vmdesc: Mapping[str, Any]) -> dict[tuple[str, int], Mapping[str, Any]]:
    """The vmdesc's device descriptions keyed by (section idstr, instance id).

    Raises:
        StreamFormatError: the document has no ``devices`` list of named entries.
    """
    devices = vmdesc.get("devices")
    if not isinstance(devices, list):
        raise StreamFormatError("vmdesc: expected a 'devices' list", offset=0,
                                section="vmdesc")
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    for i, dev in enumerate(devices):
        if not (isinstance(dev, Mapping) and isinstance(dev.get("name"), str)
                and isinstance(dev.get("instance_id"), int)):
            raise StreamFormatError(
                f"vmdesc: device entry {i} lacks a name or instance_id: {str(dev)[:200]}",
                offset=0, section="vmdesc")
        out[(dev["name"], dev["instance_id"])] = dev
    return out


class _Reader:
    __slots__ = ("data", "pos", "section")

    def __init__(self, data: bytes, section: str) -> None:
        self.data = data
        self.pos = 0
        self.section = section

    def error(self, msg: str) -> StreamFormatError:
        return StreamFormatError(msg, offset=self.pos, section=self.section)

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise self.error(
                f"{what}: expected {n} bytes, only {len(self.data) - self.pos} left in the "
                "section; the vmdesc does not describe this payload")
        raw = self.data[self.pos:end]
        self.pos = end
        return raw


def _desc_error(rd: _Reader, path: str, msg: str) -> StreamFormatError:
    return rd.error(f"vmdesc entry {path or '(top)'}: {msg}")


def _interpret(ftype: str, raw: bytes) -> Value:
    if ftype in _UNSIGNED:
        return int.from_bytes(raw, "big")
    if ftype in _SIGNED:
        return int.from_bytes(raw, "big", signed=True)
    if ftype == "bool" and len(raw) == 1:
        return raw[0] != 0
    return raw


def _struct(rd: _Reader, desc: Mapping[str, Any], prefix: str, out: list[Field],
            depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _desc_error(rd, prefix, f"nesting deeper than {_MAX_DEPTH}")
    fields = desc.get("fields", [])
    if not isinstance(fields, list):
        raise _desc_error(rd, prefix, "'fields' is not a list")
    for f in fields:
        _field(rd, f, prefix, out, depth)
    _subsections(rd, desc, prefix, out, depth)


def _subsections(rd: _Reader, desc: Mapping[str, Any], prefix: str, out: list[Field],
                 depth: int) -> None:
    vmsd = desc.get("vmsd_name", "")
    subs_raw = desc.get("subsections", [])
    subs = {s.get("vmsd_name"): s for s in subs_raw if isinstance(s, Mapping)} if isinstance(
        subs_raw, list) else {}
    data = rd.data
    while rd.pos + 2 <= len(data) and data[rd.pos] == SectionType.SUBSECTION:
        n = data[rd.pos + 1]
        if not isinstance(vmsd, str) or n < len(vmsd) + 1 or rd.pos + 2 + n > len(data):
            return
        name = data[rd.pos + 2:rd.pos + 2 + n]
        if not name.startswith(vmsd.encode()):
            return  # not ours: QEMU's loader stops here too
        text = name.decode("ascii", "replace")
        sub = subs.get(text)
        if sub is None:
            raise rd.error(
                f"subsection {text!r} is not described by the vmdesc (it lists "
                f"{sorted(str(k) for k in subs) or 'none'}); the vmdesc was written for "
                "another state of this device")
        rd.take(2 + n, f"subsection {text}")
        rd.take(4, f"subsection {text} version")
        _struct(rd, sub, f"{prefix}{text}.", out, depth + 1)


def _field(rd: _Reader, f: Any, prefix: str, out: list[Field], depth: int) -> None:
    if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
        raise _desc_error(rd, prefix, f"field without a name: {str(f)[:200]}")
    name = f["name"]
    ftype = f.get("type", "unknown")
    ftype = ftype if isinstance(ftype, str) else "unknown"
    if "array_len" in f:
        count = f["array_len"]
        if not isinstance(count, int) or not 0 <= count <= _MAX_ARRAY:
            raise _desc_error(rd, prefix + name, f"bad array_len {count!r}")
        names: Iterable[str] = (f"{name}[{i}]" for i in range(count))
    elif "index" in f:
        names = (f"{name}[{f['index']}]",)
    else:
        names = (name,)
    struct = f.get("struct")
    for elem in names:
        path = prefix + elem
        if isinstance(struct, Mapping):
            _struct(rd, struct, path + ".", out, depth + 1)
        elif isinstance(f.get("fields"), list):  # tmp / vstruct: the vmsd is inline
            _struct(rd, f, path + ".", out, depth + 1)
        else:
            size = f.get("size")
            if not isinstance(size, int) or size < 0:
                raise _desc_error(rd, path, f"bad size {size!r}")
            offset = rd.pos
            raw = rd.take(size, path)
            out.append(Field(path, ftype, offset, size, _interpret(ftype, raw)))


def decode_device(desc: Mapping[str, Any], payload: bytes) -> DecodedDevice:
    """Decode one device section's payload with its vmdesc entry.

    Raises:
        StreamFormatError: the payload does not fit the description (too short, bytes
            left over, an undescribed subsection) or the description is malformed; the
            offset is within the payload.
    """
    name = str(desc.get("name", "?"))
    rd = _Reader(bytes(payload), name)
    out: list[Field] = []
    _struct(rd, desc, "", out, 0)
    if rd.pos != len(rd.data):
        raise rd.error(
            f"the vmdesc describes {rd.pos} bytes but the section holds {len(rd.data)}; "
            "it was written for another state of this device")
    version = desc.get("version")
    inst = desc.get("instance_id")
    return DecodedDevice(name, inst if isinstance(inst, int) else 0,
                         str(desc.get("vmsd_name", name)),
                         version if isinstance(version, int) else 0, _unique(out))


def _unique(fields: list[Field]) -> tuple[Field, ...]:
    # Paths can collide: i8254 has a field literally named "channels[0].next_transition_time"
    # next to the array "channels". Later occurrences get "#2", "#3", ...
    seen: dict[str, int] = {}
    out = []
    for f in fields:
        n = seen.get(f.path, 0) + 1
        seen[f.path] = n
        out.append(f if n == 1 else Field(f"{f.path}#{n}", f.type, f.offset, f.size, f.value))
    return tuple(out)


def changed_byte_ranges(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """[start, end) ranges where two byte strings differ (the longer tail counts)."""
    ranges: list[tuple[int, int]] = []
    n = min(len(old), len(new))
    i = 0
    while i < n:
        if old[i] != new[i]:
            j = i
            while j < n and old[j] != new[j]:
                j += 1
            ranges.append((i, j))
            i = j
        else:
            i += 1
    if len(old) != len(new):
        ranges.append((n, max(len(old), len(new))))
    return ranges


@dataclass(frozen=True, slots=True)
class FieldChange:
    """A field whose value differs (``old``/``new`` None: only on one side)."""

    path: str
    type: str
    old: Value | None
    new: Value | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; byte values as hex plus the changed byte ranges."""
        def j(v: Value | None) -> int | bool | str | None:
            return v.hex() if isinstance(v, bytes) else v
        doc: dict[str, Any] = {"path": self.path, "type": self.type, "old": j(self.old),
                               "new": j(self.new)}
        if isinstance(self.old, bytes) and isinstance(self.new, bytes):
            doc["changed_bytes"] = [list(r) for r in changed_byte_ranges(self.old, self.new)]
        return doc


def diff_fields(a: Sequence[Field], b: Sequence[Field]) -> list[FieldChange]:
    """Fields whose values differ between two decodings of one device, in ``b``'s order
    (fields only in ``a`` last)."""
    old = {f.path: f for f in a}
    seen = set()
    out: list[FieldChange] = []
    for f in b:
        seen.add(f.path)
        prev = old.get(f.path)
        if prev is None:
            out.append(FieldChange(f.path, f.type, None, f.value))
        elif prev.value != f.value or type(prev.value) is not type(f.value):
            out.append(FieldChange(f.path, f.type, prev.value, f.value))
    out.extend(FieldChange(f.path, f.type, f.value, None) for f in a if f.path not in seen)
    return out


def format_value(v: Value | None, *, limit: int = 32) -> str:
    """Human rendering: ints in decimal and hex, bools, bytes as (shortened) hex."""
    if v is None:
        return "(absent)"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v} (0x{v & 0xFFFFFFFFFFFFFFFF:x})" if v < 0 else f"{v} (0x{v:x})"
    hexed = v.hex()
    if len(v) > limit:
        return f"{v[:limit].hex()}... ({len(v)} bytes)"
    return hexed or "(empty)"
