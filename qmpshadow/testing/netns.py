"""Network namespaces and veth pairs standing in for other hosts in tests.

A :class:`Netns` is a named network namespace (``ip netns add``) with its loopback up.
:meth:`Netns.veth_to_host` links it to the host namespace with a veth pair carrying a
private /30 (10.200.0.0/13, picked at random and checked against the host's addresses), and
:func:`veth_between` links two namespaces. Commands run inside with :meth:`Netns.run` or by
prefixing an argv with :meth:`Netns.exec_argv` (``ip netns exec NAME ...`` execs the command,
so the pid of a process started that way is the command's own). :meth:`Veth.set_up` cuts and
restores a link (an interface set down drops every packet: TCP connections stall rather than
reset, as when a cable is pulled).

Everything is cleaned up by :meth:`Netns.delete` (processes still inside are SIGKILLed first,
then the namespace and with it every veth end inside it is removed). Use the context
managers :func:`temporary_netns` or ``with Netns.create(...) as ns:`` so that a failing test
cannot leak a namespace. Names carry the creating pid; :func:`cleanup_stale` removes those
of dead creators.

Everything needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2. Tests call
:func:`netns_unavailable_reason` and skip with its answer.

Example::

    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with temporary_netns() as ns:
        link = ns.veth_to_host()
        proc = subprocess.Popen(ns.exec_argv(["qemu-system-x86_64", ...]))
        ...  # reach it at link.peer_addr from the host, link.host_addr from inside
        link.set_up(False)  # cut the link
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from qmpshadow.errors import QmpShadowError

__all__ = [
    "Netns",
    "NetnsError",
    "Veth",
    "cleanup_stale",
    "netns_unavailable_reason",
    "temporary_netns",
    "veth_between",
]

NAME_PREFIX = "qsns"
_NAME_RE = re.compile(rf"{NAME_PREFIX}-(\d+)-[0-9a-f]+\Z")
_POOL = ipaddress.IPv4Network("10.200.0.0/13")
_TIMEOUT = 15.0


class NetnsError(QmpShadowError):
    """An ``ip`` command for a network namespace or veth pair failed.

    Carries the ``argv`` and ``stderr`` of the failed command.
    """

    def __init__(self, message: str, *, argv: Sequence[str] = (), stderr: str = "") -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        self.stderr = stderr


def _ip(*args: str, check: bool = True, timeout: float = _TIMEOUT
        ) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:
        raise NetnsError(
            "the `ip` command (iproute2) is not installed; expected it for network "
            "namespaces (Debian: apt-get install iproute2)", argv=argv) from err
    except subprocess.TimeoutExpired as err:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {timeout}s",
                         argv=argv) from err
    if check and proc.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()}; "
            "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)",
            argv=argv, stderr=proc.stderr)
    return proc


def netns_unavailable_reason() -> str | None:
    """``None`` when namespaces and veth pairs can be made here, else why not.

    Creates and deletes a probe namespace with a veth pair. Never raises.
    """
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (Debian: apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); not root"
    try:
        with temporary_netns() as ns:
            ns.veth_to_host()
    except NetnsError as err:
        return f"`ip netns` is not permitted here: {err}"
    return None


def _rand_hex(n: int = 6) -> str:
    return "".join(random.choice("0123456789abcdef") for _ in range(n))


def _host_networks() -> list[ipaddress.IPv4Network]:
    proc = _ip("-j", "addr", "show", check=False)
    nets: list[ipaddress.IPv4Network] = []
    try:
        doc = json.loads(proc.stdout or "[]")
    except ValueError:
        return nets
    for link in doc:
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                with contextlib.suppress(ValueError):
                    nets.append(ipaddress.IPv4Network(
                        f"{info['local']}/{info['prefixlen']}", strict=False))
    return nets


_allocated: set[ipaddress.IPv4Network] = set()


def _allocate_subnet() -> ipaddress.IPv4Network:
    used = _host_networks()
    for _ in range(200):
        index = random.randrange(_POOL.num_addresses // 4)
        net = ipaddress.IPv4Network((int(_POOL.network_address) + 4 * index, 30))
        if net in _allocated or any(net.overlaps(u) for u in used):
            continue
        _allocated.add(net)
        return net
    raise NetnsError(f"no free /30 found in {_POOL} after 200 tries")


@dataclass
class Veth:
    """A veth pair: ``host_if`` (in ``host_ns``, None = the host namespace) with
    ``host_addr``, and ``peer_if`` in ``peer_ns`` with ``peer_addr``; both /``prefixlen``."""

    host_if: str
    peer_if: str
    host_addr: str
    peer_addr: str
    prefixlen: int
    peer_ns: str
    host_ns: str | None = None

    def _link_args(self, side: str) -> list[str]:
        if side == "peer":
            return ["-n", self.peer_ns, "link", "set", self.peer_if]
        if side == "host":
            return [*(["-n", self.host_ns] if self.host_ns else []), "link", "set", self.host_if]
        raise NetnsError(f"veth side: expected 'peer' or 'host', got {side!r}")

    def set_up(self, up: bool, *, side: str = "peer") -> None:
        """Bring one end up or down (down = link cut: packets are dropped, not refused).

        Raises:
            NetnsError: the ``ip`` command failed or ``side`` is not 'peer'/'host'.
        """
        _ip(*self._link_args(side), "up" if up else "down")


@dataclass
class Netns:
    """A network namespace named ``name`` (see the module docstring).

    Create with :meth:`create`; :meth:`delete` (or leaving the ``with`` block) removes it.
    """

    name: str
    links: list[Veth] = field(default_factory=list)
    _deleted: bool = False

    @classmethod
    def create(cls, name: str | None = None) -> Netns:
        """Create a namespace (default name ``qsns-<pid>-<random>``) with ``lo`` up.

        Raises:
            NetnsError: not permitted (not root) or the name exists.
        """
        ns = cls(name or f"{NAME_PREFIX}-{os.getpid()}-{_rand_hex()}")
        _ip("netns", "add", ns.name)
        try:
            _ip("-n", ns.name, "link", "set", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this namespace (``ip netns exec NAME``)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = _TIMEOUT
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace and return its completed process (text).

        Raises:
            NetnsError: with ``check``, the command exited non-zero; or it timed out.
        """
        full = self.exec_argv(argv)
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as err:
            raise NetnsError(f"`{' '.join(full)}` did not finish within {timeout}s",
                             argv=full) from err
        if check and proc.returncode != 0:
            raise NetnsError(
                f"`{' '.join(full)}` exited {proc.returncode}: {proc.stderr.strip()}",
                argv=full, stderr=proc.stderr)
        return proc

    def veth_to_host(self, *, host_addr: str | None = None, ns_addr: str | None = None,
                     prefixlen: int = 30) -> Veth:
        """Link this namespace to the host namespace with a veth pair and addresses.

        Defaults: a free /30 from 10.200.0.0/13, host side .1, namespace side .2.

        Raises:
            NetnsError: an ``ip`` command failed.
        """
        return _make_veth(None, self, host_addr, ns_addr, prefixlen, owner=self)

    def pids(self) -> list[int]:
        """Pids of the processes inside the namespace."""
        proc = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process inside and wait (up to ``timeout``) until they are gone."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def delete(self) -> None:
        """Kill the processes inside, then delete the namespace (and the veth ends in it).

        Idempotent; never raises for a namespace that is already gone.
        """
        if self._deleted:
            return
        self._deleted = True
        self.kill_all()
        _ip("netns", "del", self.name, check=False)
        for link in self.links:
            # the host end of a veth vanishes with its peer; this is only for a host end
            # left behind by a partially failed setup
            args = ["-n", link.host_ns] if link.host_ns else []
            _ip(*args, "link", "del", link.host_if, check=False)
            with contextlib.suppress(ValueError):
                _allocated.discard(ipaddress.IPv4Network(
                    f"{link.host_addr}/{link.prefixlen}", strict=False))
        self.links.clear()

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.delete()


def _make_veth(host_ns: Netns | None, peer_ns: Netns, host_addr: str | None,
               peer_addr: str | None, prefixlen: int, *, owner: Netns) -> Veth:
    if host_addr is None or peer_addr is None:
        net = _allocate_subnet()
        hosts = list(net.hosts())
        host_addr = host_addr or str(hosts[0])
        peer_addr = peer_addr or str(hosts[1])
        prefixlen = net.prefixlen
    tag = _rand_hex(8)
    link = Veth(host_if=f"qv{tag}a", peer_if=f"qv{tag}b", host_addr=host_addr,
                peer_addr=peer_addr, prefixlen=prefixlen, peer_ns=peer_ns.name,
                host_ns=host_ns.name if host_ns else None)
    host_n = ["-n", host_ns.name] if host_ns else []
    _ip(*host_n, "link", "add", link.host_if, "type", "veth", "peer", "name", link.peer_if,
        "netns", peer_ns.name)
    owner.links.append(link)
    _ip(*host_n, "addr", "add", f"{host_addr}/{prefixlen}", "dev", link.host_if)
    _ip(*host_n, "link", "set", link.host_if, "up")
    _ip("-n", peer_ns.name, "addr", "add", f"{peer_addr}/{prefixlen}", "dev", link.peer_if)
    _ip("-n", peer_ns.name, "link", "set", link.peer_if, "up")
    return link


def veth_between(a: Netns, b: Netns, *, a_addr: str | None = None, b_addr: str | None = None,
                 prefixlen: int = 30) -> Veth:
    """Link namespaces ``a`` and ``b`` directly (``host_*`` fields are ``a``'s side).

    Deleting either namespace removes the pair.

    Raises:
        NetnsError: an ``ip`` command failed.
    """
    return _make_veth(a, b, a_addr, b_addr, prefixlen, owner=a)


@contextlib.contextmanager
def temporary_netns(name: str | None = None) -> Iterator[Netns]:
    """A namespace that is deleted (processes killed first) when the block exits.

    Raises:
        NetnsError: the namespace cannot be created.
    """
    ns = Netns.create(name)
    try:
        yield ns
    finally:
        ns.delete()


def cleanup_stale() -> list[str]:
    """Delete ``qsns-<pid>-*`` namespaces whose creating process is gone; return their names."""
    proc = _ip("netns", "list", check=False)
    removed = []
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        Netns(name).delete()
        removed.append(name)
    return removed
