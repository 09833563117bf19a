"""VM specification: what a VM looks like, independent of its role (primary or shadow).

A :class:`VmSpec` is loaded from TOML (:meth:`VmSpec.from_toml`) or from a plain mapping
(:meth:`VmSpec.from_dict`); :mod:`qmpshadow.qemu.argv` turns it into a QEMU command line
for a role. The format is documented in ``docs/qemu-and-qmp.md``; ``examples/vm.toml`` is
a commented example. Unknown keys are errors rather than warnings so that a typo never
silently yields a VM whose device model differs from its shadow's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from qmpshadow.disk.spec import DiskSpec, disks_from_list
from qmpshadow.errors import ConfigError
from qmpshadow.qemu.nics import NicSpec, nics_from_toml, output_commit_from_toml

AccelName = Literal["auto", "kvm", "tcg"]
MemoryBackendKind = Literal["ram", "file"]

#: RAMBlock idstr QEMU gives the main RAM of the ``pc`` and ``q35`` machines for a plain
#: ``-m``; a shadow's backend must carry the same id (measured on QEMU 7.2).
DEFAULT_BACKEND_ID = "pc.ram"

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. VM names follow
# the same rule because they end up in QEMU ids, file names and MQTT topics.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_MAX_NAME = 64
_MAX_VCPUS = 1024
# 16 TiB: far beyond anything this tool targets, low enough to catch unit mistakes
# (someone writing bytes or KiB into size_mib).
_MAX_SIZE_MIB = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MemorySpec:
    """Main guest RAM.

    ``backend_id`` is the RAMBlock idstr of the main RAM: ``pc.ram`` for a plain ``-m``
    on the pc/q35 machines, otherwise the id of the memory backend object. A shadow's RAM
    backend gets the same id so that migration streams and RAM files line up.

    Raises:
        ConfigError: a value is out of range or the combination is inconsistent.
    """

    size_mib: int
    backend: MemoryBackendKind = "ram"
    backend_id: str = DEFAULT_BACKEND_ID
    mem_path: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.size_mib <= _MAX_SIZE_MIB:
            raise ConfigError(
                f"memory.size_mib: expected a size in MiB between 1 and {_MAX_SIZE_MIB}, "
                f"got {self.size_mib}; write e.g. size_mib = 256 for 256 MiB"
            )
        if self.backend not in get_args(MemoryBackendKind):
            raise ConfigError(
                f"memory.backend: expected 'ram' or 'file', got {self.backend!r}"
            )
        _check_id("memory.backend_id", self.backend_id)
        if self.backend == "file" and self.mem_path is None:
            raise ConfigError(
                "memory.mem_path: backend = 'file' needs mem_path, the file QEMU maps "
                "shared (e.g. /dev/shm/<vm>.ram); got none. Add mem_path or use "
                "backend = 'ram'"
            )
        if self.backend == "ram" and self.mem_path is not None:
            raise ConfigError(
                f"memory.mem_path: only used with backend = 'file', got mem_path = "
                f"{str(self.mem_path)!r} with backend = 'ram'. Set backend = 'file' or "
                "drop mem_path"
            )


@dataclass(frozen=True, slots=True)
class VmSpec:
    """A VM's device model and boot configuration (role-independent).

    ``serial`` is ``True`` (a serial port logged to the run directory's
    ``serial.log``), ``False`` (no serial port) or a path to log to. ``extra_args`` are
    appended verbatim to every role's command line: anything there must be identical on
    the primary and its shadow, or migration fails.

    Raises:
        ConfigError: a value is invalid; the message names the key.
    """

    name: str
    memory: MemorySpec
    vcpus: int = 1
    machine: str = "pc"
    cpu: str = "qemu64"
    kernel: Path | None = None
    kernel_args: str | None = None
    initrd: Path | None = None
    serial: Path | bool = True
    extra_args: tuple[str, ...] = ()
    accel: AccelName = "auto"
    #: ``[[disks]]`` (docs/disks.md)
    disks: tuple[DiskSpec, ...] = ()
    #: ``[[nics]]`` (qmpshadow.qemu.nics) and ``output_commit = "on"|"off"``: the primary's
    #: network frames and serial bytes held until their epoch commits (docs/output-commit.md).
    nics: tuple[NicSpec, ...] = ()
    output_commit: bool = False

    def __post_init__(self) -> None:
        _check_id("name", self.name)
        if len(self.name) > _MAX_NAME:
            raise ConfigError(
                f"name: expected at most {_MAX_NAME} characters, got {len(self.name)} "
                f"({self.name!r})"
            )
        if not 1 <= self.vcpus <= _MAX_VCPUS:
            raise ConfigError(
                f"vcpus: expected between 1 and {_MAX_VCPUS}, got {self.vcpus}"
            )
        if not self.machine or "," in self.machine or self.machine.startswith("-"):
            raise ConfigError(
                f"machine: expected a machine type such as 'pc' or 'q35' without options, "
                f"got {self.machine!r}; put machine options in extra_args "
                "(e.g. ['-machine', 'smm=off'])"
            )
        if not self.cpu or self.cpu.startswith("-"):
            raise ConfigError(f"cpu: expected a CPU model such as 'qemu64', got {self.cpu!r}")
        if self.accel not in get_args(AccelName):
            raise ConfigError(
                f"accel: expected 'auto', 'kvm' or 'tcg', got {self.accel!r}"
            )
        if self.kernel is None and (self.kernel_args is not None or self.initrd is not None):
            raise ConfigError(
                "kernel_args/initrd: given without kernel; QEMU refuses -append and "
                "-initrd without -kernel. Add kernel or drop them"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> VmSpec:
        """Build a spec from a mapping shaped like the TOML format.

        Relative paths are resolved against ``base_dir`` when given (the TOML file's
        directory for :meth:`from_toml`), else kept as written; ``~`` is expanded.

        Raises:
            ConfigError: unknown key, missing key, wrong type or invalid value; the
                message names the key.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"VM spec: expected a table/mapping, got {type(data).__name__}"
            )
        _reject_unknown(data, _TOP_KEYS, "")
        name = _take(data, "name", str, "name", required=True)
        mem_raw = data.get("memory")
        if mem_raw is None:
            raise ConfigError(
                "memory: missing; add a [memory] table with at least size_mib, e.g. "
                "[memory] size_mib = 256"
            )
        if not isinstance(mem_raw, Mapping):
            raise ConfigError(
                f"memory: expected a table with size_mib, backend, ..., got "
                f"{type(mem_raw).__name__} {mem_raw!r}"
            )
        memory = _memory_from_dict(mem_raw, base_dir)

        kwargs: dict[str, Any] = {"name": name, "memory": memory}
        for key, typ in (("vcpus", int), ("machine", str), ("cpu", str),
                         ("kernel_args", str), ("accel", str)):
            if key in data:
                kwargs[key] = _take(data, key, typ, key)
        for key in ("kernel", "initrd"):
            if key in data:
                kwargs[key] = _path(_take(data, key, str, key), base_dir)
        if "serial" in data:
            serial = data["serial"]
            if isinstance(serial, bool):
                kwargs["serial"] = serial
            elif isinstance(serial, str) and serial:
                kwargs["serial"] = _path(serial, base_dir)
            else:
                raise ConfigError(
                    f"serial: expected true (log to the run directory), false (no serial "
                    f"port) or a file path, got {_describe(serial)}"
                )
        if "extra_args" in data:
            extra = data["extra_args"]
            if not isinstance(extra, list | tuple) or not all(
                isinstance(a, str) for a in extra
            ):
                raise ConfigError(
                    f"extra_args: expected a list of strings (one QEMU argument each), "
                    f"got {_describe(extra)}"
                )
            kwargs["extra_args"] = tuple(extra)
        if "disks" in data:
            kwargs["disks"] = disks_from_list(data["disks"], base_dir)
        if "nics" in data:
            kwargs["nics"] = nics_from_toml(data["nics"])
        if "output_commit" in data:
            kwargs["output_commit"] = output_commit_from_toml(data["output_commit"])
        return cls(**kwargs)

    @classmethod
    def from_toml_text(
        cls, text: str, *, base_dir: Path | None = None, source: str = "<string>"
    ) -> VmSpec:
        """Parse a spec from TOML text; ``source`` names it in error messages.

        Raises:
            ConfigError: invalid TOML or invalid spec.
        """
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML: {err}") from err
        try:
            return cls.from_dict(data, base_dir=base_dir)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> VmSpec:
        """Load a spec from a TOML file; relative paths are relative to its directory.

        Raises:
            ConfigError: the file cannot be read, is not TOML or is not a valid spec.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{p}: cannot read VM spec: {err}; expected a readable UTF-8 TOML file"
            ) from err
        return cls.from_toml_text(text, base_dir=p.parent.absolute(), source=str(p))

    def to_dict(self) -> dict[str, Any]:
        """The spec as a mapping in the TOML shape (``from_dict`` round-trips it)."""
        mem: dict[str, Any] = {
            "size_mib": self.memory.size_mib,
            "backend": self.memory.backend,
            "backend_id": self.memory.backend_id,
        }
        if self.memory.mem_path is not None:
            mem["mem_path"] = str(self.memory.mem_path)
        out: dict[str, Any] = {
            "name": self.name,
            "vcpus": self.vcpus,
            "machine": self.machine,
            "cpu": self.cpu,
            "accel": self.accel,
            "serial": self.serial if isinstance(self.serial, bool) else str(self.serial),
            "extra_args": list(self.extra_args),
            "memory": mem,
        }
        for key in ("kernel", "initrd"):
            value = getattr(self, key)
            if value is not None:
                out[key] = str(value)
        if self.kernel_args is not None:
            out["kernel_args"] = self.kernel_args
        if self.disks:
            out["disks"] = [
                {"id": d.id, "path": str(d.path), "mode": d.mode}
                | ({"shadow_path": str(d.shadow_path)} if d.shadow_path else {})
                for d in self.disks]
        if self.nics:
            out["nics"] = [n.to_dict() for n in self.nics]
        if self.output_commit:
            out["output_commit"] = "on"
        return out

    def replace(self, **changes: Any) -> VmSpec:
        """A copy with ``changes`` applied (validated like the original).

        Raises:
            ConfigError: the result is not a valid spec.
        """
        return dataclasses.replace(self, **changes)


_TOP_KEYS = frozenset({
    "disks",
    "name", "memory", "vcpus", "machine", "cpu", "kernel", "kernel_args", "initrd",
    "serial", "extra_args", "accel", "nics", "output_commit",
})
_MEMORY_KEYS = frozenset({"size_mib", "backend", "backend_id", "mem_path"})


def _memory_from_dict(data: Mapping[str, Any], base_dir: Path | None) -> MemorySpec:
    _reject_unknown(data, _MEMORY_KEYS, "memory.")
    kwargs: dict[str, Any] = {
        "size_mib": _take(data, "size_mib", int, "memory.size_mib", required=True),
    }
    if "backend" in data:
        kwargs["backend"] = _take(data, "backend", str, "memory.backend")
    if "backend_id" in data:
        kwargs["backend_id"] = _take(data, "backend_id", str, "memory.backend_id")
    if "mem_path" in data:
        kwargs["mem_path"] = _path(_take(data, "mem_path", str, "memory.mem_path"), base_dir)
    return MemorySpec(**kwargs)


def _reject_unknown(data: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; expected some of "
            f"{', '.join(prefix + k for k in sorted(known))}. Check the spelling "
            "(docs/qemu-and-qmp.md lists the format)"
        )


def _take(
    data: Mapping[str, Any], key: str, typ: type, where: str, *, required: bool = False
) -> Any:
    if key not in data:
        if required:
            raise ConfigError(f"{where}: missing; expected a {typ.__name__}")
        return None
    value = data[key]
    # bool is an int subclass: `vcpus = true` must not pass as 1.
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected a {typ.__name__}, got {_describe(value)}")
    return value


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _path(value: str, base_dir: Path | None) -> Path:
    if not value:
        raise ConfigError("path: expected a non-empty path, got ''")
    p = Path(value).expanduser()
    if base_dir is not None and not p.is_absolute():
        p = base_dir / p
    return p


def _check_id(where: str, value: str) -> None:
    if not _ID_RE.match(value):
        raise ConfigError(
            f"{where}: expected a letter followed by letters, digits, '-', '.' or '_' "
            f"(QEMU's id rules), got {value!r}"
        )


def accel_name(value: str) -> AccelName:
    """Check that ``value`` is an accel name ('auto', 'kvm' or 'tcg') and return it.

    Raises:
        ConfigError: any other value.
    """
    if value not in get_args(AccelName):
        raise ConfigError(f"accel: expected 'auto', 'kvm' or 'tcg', got {value!r}")
    return cast(AccelName, value)
