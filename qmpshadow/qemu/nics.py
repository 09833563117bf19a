"""NICs of a VM spec (``[[nics]]``) and their QEMU arguments per role, with output commit.

A NIC is a tap backend (``ifname`` for the primary, ``shadow_ifname`` for its shadow: both
exist at once, so the names differ) and a guest device (``model``, ``mac``). With
``output_commit = "on"`` the primary's outgoing frames are routed through the source agent
by QEMU's own netfilters (measured on QEMU 7.2; docs/output-commit.md)::

    -chardev socket,id=oc-<nic>-out,path=...,server=on,wait=off
    -chardev socket,id=oc-<nic>-in,path=...,server=on,wait=off
    -object filter-redirector,id=oc-<nic>-r2,netdev=<nic>,queue=rx,indev=oc-<nic>-in
    -object filter-redirector,id=oc-<nic>-r1,netdev=<nic>,queue=rx,outdev=oc-<nic>-out

``queue=rx`` is the direction seen from the backend (frames the guest sends); r2 must be
created before r1 (other orders loop frames). Frames the agent writes to ``-in`` go on to
the backend. Its serial console goes to ``serial-oc.sock``; the agent appends released bytes
to the serial log. A shadow never gets the redirectors: after promotion its output flows
directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmpshadow.errors import ConfigError

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,15}\Z")
_MAC_RE = re.compile(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
NIC_KEYS = frozenset({"id", "mac", "model", "backend", "ifname", "shadow_ifname"})
SERIAL_SOCKET = "serial-oc.sock"


@dataclass(frozen=True, slots=True)
class NicSpec:
    """One NIC: tap backend + guest device.

    Raises:
        ConfigError: a value is invalid (the message names the key).
    """

    id: str
    mac: str
    ifname: str
    shadow_ifname: str
    model: str = "e1000"
    backend: str = "tap"

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.id):
            raise ConfigError(f"nics.id: expected a letter then up to 15 letters, digits, "
                              f"'-' or '_', got {self.id!r}")
        if not _MAC_RE.match(self.mac) or int(self.mac[:2], 16) & 1:
            raise ConfigError(f"nics.mac ({self.id}): expected a unicast MAC such as "
                              f"'52:54:00:12:34:56', got {self.mac!r}")
        for key in ("ifname", "shadow_ifname"):
            if not _IFNAME_RE.match(getattr(self, key)):
                raise ConfigError(f"nics.{key} ({self.id}): expected an interface name of "
                                  f"1-15 characters, got {getattr(self, key)!r}")
        if self.ifname == self.shadow_ifname:
            raise ConfigError(f"nics ({self.id}): ifname and shadow_ifname are both "
                              f"{self.ifname!r}; the primary and its shadow need their own tap")
        if self.backend != "tap":
            raise ConfigError(f"nics.backend ({self.id}): expected 'tap', got {self.backend!r}")
        if not self.model or "," in self.model:
            raise ConfigError(f"nics.model ({self.id}): expected a device such as 'e1000' "
                              f"or 'virtio-net-pci', got {self.model!r}")

    def to_dict(self) -> dict[str, Any]:
        """The TOML shape."""
        return {"id": self.id, "mac": self.mac, "model": self.model, "backend": self.backend,
                "ifname": self.ifname, "shadow_ifname": self.shadow_ifname}


def nics_from_toml(raw: object) -> tuple[NicSpec, ...]:
    """``[[nics]]`` tables → NicSpecs. Raises ConfigError naming the bad key."""
    if not isinstance(raw, list | tuple):
        raise ConfigError(f"nics: expected an array of tables ([[nics]]), got "
                          f"{type(raw).__name__}")
    out: list[NicSpec] = []
    for item in raw:
        if not isinstance(item, Mapping):
            raise ConfigError(f"nics: expected tables, got {type(item).__name__}")
        unknown = sorted(str(k) for k in item if k not in NIC_KEYS)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join('nics.' + k for k in unknown)}; "
                              f"expected some of {', '.join(sorted(NIC_KEYS))}")
        missing = [k for k in ("id", "mac", "ifname", "shadow_ifname") if k not in item]
        if missing:
            raise ConfigError(f"nics: missing {', '.join(missing)}")
        bad = [k for k, v in item.items() if not isinstance(v, str)]
        if bad:
            raise ConfigError(f"nics.{bad[0]}: expected a string, got {item[bad[0]]!r}")
        out.append(NicSpec(**{str(k): v for k, v in item.items()}))
    ids = [n.id for n in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"nics: ids must be unique, got {ids}")
    return tuple(out)


def output_commit_from_toml(raw: object) -> bool:
    """``output_commit = "on" | "off"`` (booleans too). Raises ConfigError otherwise."""
    if isinstance(raw, bool):
        return raw
    if raw in ("on", "off"):
        return raw == "on"
    raise ConfigError(f"output_commit: expected \"on\" or \"off\", got {raw!r}")


def chardev_ids(nic: NicSpec) -> tuple[str, str]:
    """(out, in) chardev ids of a NIC's redirector pair on the primary."""
    return f"oc-{nic.id}-out", f"oc-{nic.id}-in"


def _opt(path: Path) -> str:
    return str(path).replace(",", ",,")


def serial_socket_argv(root: Path) -> list[str]:
    """The output-commit primary's serial console: a socket the source agent reads."""
    return ["-chardev", f"socket,id=serial0,path={_opt(root / SERIAL_SOCKET)},server=on,"
            "wait=off", "-serial", "chardev:serial0"]


def nic_argv(nics: tuple[NicSpec, ...], root: Path, *, shadow: bool,
             output_commit: bool) -> list[str]:
    """QEMU arguments of the NICs for one role (redirectors on an output-commit primary)."""
    argv: list[str] = []
    for nic in nics:
        ifname = nic.shadow_ifname if shadow else nic.ifname
        argv += ["-netdev", f"tap,id={nic.id},ifname={ifname},script=no,downscript=no",
                 "-device", f"{nic.model},netdev={nic.id},mac={nic.mac}"]
        if output_commit and not shadow:
            out, inn = chardev_ids(nic)
            for cid in (out, inn):
                argv += ["-chardev", f"socket,id={cid},path={_opt(root / (cid + '.sock'))},"
                         "server=on,wait=off"]
            argv += ["-object", f"filter-redirector,id={inn}-r2,netdev={nic.id},queue=rx,"
                     f"indev={inn}",
                     "-object", f"filter-redirector,id={out}-r1,netdev={nic.id},queue=rx,"
                     f"outdev={out}"]
    return argv
