"""What a migration should do: options, and the capabilities/parameters they imply.

Sans-I/O: :class:`MigrateOptions` validates user input; :func:`plan_settings` turns it into
the ``migrate-set-capabilities`` / ``migrate-set-parameters`` arguments of the source and of
the destination. Which *combinations* of capabilities QEMU accepts is QEMU's decision
(``migrate-set-capabilities`` refuses invalid sets atomically); this module only checks what
qmpshadow itself depends on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from qmpshadow.errors import ConfigError

SourceAfter = Literal["pause", "quit"]
Transport = Literal["tcp", "unix"]

#: Capabilities that must be set on both ends (QEMU checks them on the destination too,
#: or the destination cannot parse what the source sends).
BOTH_SIDES = frozenset({
    "multifd", "postcopy-ram", "x-ignore-shared", "compress", "postcopy-preempt",
    "late-block-activate", "validate-uuid", "return-path", "x-colo",
})

#: Parameters that must be equal on both ends.
BOTH_SIDES_PARAMS = frozenset({
    "multifd-channels", "multifd-compression", "decompress-threads",
})

#: QEMU's upper bound of ``downtime-limit`` in ms (MAX_MIGRATE_DOWNTIME).
MAX_DOWNTIME_MS = 2_000_000
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB]?)?\s*(?:/s)?\s*\Z")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NAME_RE = re.compile(r"[a-z][a-z0-9-]*\Z")


def parse_bandwidth(text: str) -> int:
    """Bytes per second from ``"200M"`` (MiB/s), ``"1G"``, ``"512K"``, ``"1048576"``.

    Suffixes are binary (K = 1024) like QEMU's; ``B``, ``iB`` and ``/s`` are accepted.

    Raises:
        ConfigError: not a positive size.
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise ConfigError(
            f"bandwidth: expected a rate such as 200M (MiB/s), 1G or 1048576 (bytes/s), "
            f"got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"bandwidth: expected a positive rate, got {text!r}")
    return value


def parse_assignment(text: str, what: str) -> tuple[str, str]:
    """Split ``name=value`` (``name`` alone means ``name=on``).

    Raises:
        ConfigError: the name is not a QMP-style lowercase name.
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"{what}: expected NAME or NAME=VALUE with a lowercase QMP name such as "
            f"xbzrle or max-cpu-throttle, got {text!r}")
    return name, value.strip() if sep else "on"


def parse_switch(value: str, what: str) -> bool:
    """``on/off/true/false/yes/no/1/0`` as a bool.

    Raises:
        ConfigError: anything else.
    """
    low = value.lower()
    if low in ("on", "true", "yes", "1"):
        return True
    if low in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"{what}: expected on or off, got {value!r}")


def parse_param_value(value: str) -> Any:
    """A ``--param`` value as JSON-ish: int, bool (true/false) or string."""
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


@dataclass(frozen=True, slots=True)
class MigrateOptions:
    """How to migrate.

    - ``multifd_channels``: enable multifd with that many channels (None: off).
    - ``auto_converge``: throttle the guest's vCPUs when it dirties faster than the link.
    - ``downtime_limit_ms``: the pause QEMU may take at completion (QEMU default 300 ms).
    - ``bandwidth``: max-bandwidth in bytes/s (QEMU 7.2 default 128 MiB/s).
    - ``postcopy_after``: switch to postcopy once this many passes over RAM were made
      (None: never). After the switch a failure cannot be rolled back.
    - ``capabilities`` / ``parameters``: further ones, passed to QEMU as they are
      (capabilities in :data:`BOTH_SIDES` / parameters in :data:`BOTH_SIDES_PARAMS` are
      also set on the destination).
    - ``timeout``: give up (and roll back) when not completed after this many seconds.
    - ``stall_timeout``: give up when no byte moved for this many seconds (a cut link
      stalls TCP rather than failing it).
    - ``source_after``: on success leave the source paused (``pause``) or ``quit`` it.
    - ``transport``: ``tcp`` (required with a destination namespace) or ``unix``.
    - ``poll_interval``: seconds between ``query-migrate`` polls (completion is noticed
      at once through the MIGRATION event, not by polling).

    Raises:
        ConfigError: a value is out of range (the message names the option).
    """

    multifd_channels: int | None = None
    auto_converge: bool = False
    downtime_limit_ms: int | None = None
    bandwidth: int | None = None
    postcopy_after: int | None = None
    capabilities: Mapping[str, bool] = field(default_factory=dict)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 600.0
    stall_timeout: float = 20.0
    source_after: SourceAfter = "pause"
    transport: Transport = "tcp"
    poll_interval: float = 0.25

    def __post_init__(self) -> None:
        if self.multifd_channels is not None and not 1 <= self.multifd_channels <= 255:
            raise ConfigError(
                f"multifd channels: expected 1..255 (QEMU's range), got "
                f"{self.multifd_channels}")
        if self.downtime_limit_ms is not None and not (
                0 <= self.downtime_limit_ms <= MAX_DOWNTIME_MS):
            raise ConfigError(
                f"downtime limit: expected 0..{MAX_DOWNTIME_MS} ms, got "
                f"{self.downtime_limit_ms}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ConfigError(f"bandwidth: expected a positive rate, got {self.bandwidth}")
        if self.postcopy_after is not None and self.postcopy_after < 1:
            raise ConfigError(
                f"postcopy after: expected a number of passes >= 1, got {self.postcopy_after}")
        for what, value in (("timeout", self.timeout), ("stall timeout", self.stall_timeout),
                            ("poll interval", self.poll_interval)):
            if not value > 0:
                raise ConfigError(f"{what}: expected a positive number of seconds, got {value}")
        if self.source_after not in get_args(SourceAfter):
            raise ConfigError(
                f"source after: expected 'pause' or 'quit', got {self.source_after!r}")
        if self.transport not in get_args(Transport):
            raise ConfigError(f"transport: expected 'tcp' or 'unix', got {self.transport!r}")
        for name in self.capabilities:
            parse_assignment(name, "capability")
        for name in self.parameters:
            parse_assignment(name, "parameter")
        managed = {"multifd": self.multifd_channels is not None,
                   "auto-converge": self.auto_converge,
                   "postcopy-ram": self.postcopy_after is not None}
        for name, on in managed.items():
            if on and self.capabilities.get(name) is False:
                raise ConfigError(
                    f"capability {name}: turned off with --cap {name}=off but needed by "
                    "another option; drop one of them")


@dataclass(frozen=True, slots=True)
class Settings:
    """Capabilities and parameters for one end of the migration."""

    capabilities: dict[str, bool]
    parameters: dict[str, Any]


def plan_settings(opts: MigrateOptions) -> tuple[Settings, Settings]:
    """(source, destination) settings implied by ``opts``.

    Both ends get ``events`` (MIGRATION events let completion be noticed at once).
    """
    src_caps: dict[str, bool] = {"events": True}
    if opts.multifd_channels is not None:
        src_caps["multifd"] = True
    if opts.auto_converge:
        src_caps["auto-converge"] = True
    if opts.postcopy_after is not None:
        src_caps["postcopy-ram"] = True
    src_caps.update(opts.capabilities)
    dst_caps = {"events": True}
    dst_caps.update({k: v for k, v in src_caps.items() if k in BOTH_SIDES})

    src_params: dict[str, Any] = {}
    if opts.multifd_channels is not None:
        src_params["multifd-channels"] = opts.multifd_channels
    if opts.downtime_limit_ms is not None:
        src_params["downtime-limit"] = opts.downtime_limit_ms
    if opts.bandwidth is not None:
        src_params["max-bandwidth"] = opts.bandwidth
    src_params.update(opts.parameters)
    dst_params = {k: v for k, v in src_params.items() if k in BOTH_SIDES_PARAMS}
    return Settings(src_caps, src_params), Settings(dst_caps, dst_params)


def changed_settings(wanted: Settings, current_caps: Mapping[str, bool],
                     current_params: Mapping[str, Any]) -> Settings:
    """The previous values of what ``wanted`` changes (what a rollback restores).

    Capabilities unknown to ``current_caps`` are left out (QEMU would refuse them anyway);
    so are parameters QEMU does not report.
    """
    caps = {k: bool(current_caps[k]) for k, v in wanted.capabilities.items()
            if k in current_caps and bool(current_caps[k]) != v}
    params = {k: current_params[k] for k, v in wanted.parameters.items()
              if k in current_params and current_params[k] != v}
    return Settings(caps, params)
