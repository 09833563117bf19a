"""A private LAN for network tests: a namespace with a bridge, the peer's address on it,
and the VMs' tap devices moved in.

QEMU creates its tap (``ifname``) in the namespace it runs in (the host's); a tap keeps
working when moved to another namespace while QEMU holds it (measured), so :meth:`Lan.attach`
moves it into the LAN's namespace and enslaves it to the bridge. Nothing of it touches the
host's own interfaces, and the LAN disappears with the namespace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .netns import Netns, NetnsError, _ip

__all__ = ["Lan"]


@dataclass
class Lan:
    """Bridge ``br0`` in ``ns`` with ``peer_addr``/``prefixlen`` on it."""

    ns: Netns
    peer_addr: str = "10.77.0.1"
    prefixlen: int = 24

    @classmethod
    def create(cls) -> Lan:
        """A new namespace with the bridge up. Raises NetnsError (not root, no iproute2)."""
        lan = cls(Netns.create())
        try:
            lan.ns.run(["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0",
                        "forward_delay", "0"])
            lan.ns.run(["ip", "addr", "add", f"{lan.peer_addr}/{lan.prefixlen}", "dev", "br0"])
            lan.ns.run(["ip", "link", "set", "br0", "up"])
        except BaseException:
            lan.ns.delete()
            raise
        return lan

    def attach(self, ifname: str, timeout: float = 10.0) -> None:
        """Move the host's tap ``ifname`` (once it exists) onto the bridge.

        Raises NetnsError when it does not appear within ``timeout`` or cannot be moved.
        """
        deadline = time.monotonic() + timeout
        while _ip("link", "show", ifname, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise NetnsError(f"tap {ifname!r} did not appear within {timeout}s (did "
                                 "QEMU start with this NIC?)")
            time.sleep(0.05)
        _ip("link", "set", ifname, "netns", self.ns.name)
        self.ns.run(["ip", "link", "set", ifname, "master", "br0", "up"])

    def delete(self) -> None:
        """Kill what runs inside and remove the namespace (and the taps in it)."""
        self.ns.delete()

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()
