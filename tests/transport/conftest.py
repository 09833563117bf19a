"""Fixtures of the transport tests: a test PKI, the transport cases, network namespaces."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from qmpshadow.testing.netns import Netns, netns_unavailable_reason, veth_between
from qmpshadow.transport.certs import create_ca, init_dev_pki
from tests.transport.cases import CASES, Case, Pki

T = TypeVar("T")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA + source/shadow/intruder; a rogue CA with its own 'source'; a self-signed 'source'."""
    d = tmp_path_factory.mktemp("pki")
    init_dev_pki(d, ["source", "shadow", "intruder"])
    rogue = tmp_path_factory.mktemp("rogue-pki")
    init_dev_pki(rogue, ["source"])
    selfsigned = tmp_path_factory.mktemp("selfsigned")
    pair = create_ca(selfsigned, common_name="source")
    pair.cert.rename(selfsigned / "source.pem")
    pair.key.rename(selfsigned / "source.key")
    return Pki(dir=d, rogue_dir=rogue, selfsigned_dir=selfsigned)


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, pki: Pki, tmp_path: Path) -> Case:
    """Each transport of the conformance suite."""
    c = CASES[request.param](pki, tmp_path)
    reason = c.available()
    if reason:
        pytest.skip(f"{c.name}: {reason}")
    return c


# ---------------------------------------------------------------------------------------------
# Network namespaces: two test hosts joined by a veth pair, nothing in the root namespace.
# Namespaces and veths come from qmpshadow.testing.netns; sockets are created inside a
# namespace by a thread that entered it (a socket keeps its namespace for life).

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class TwoHosts:
    """Namespaces ``a`` (client host) and ``b`` (server host) with addresses on a veth."""

    a: str
    b: str
    addr_a: str
    addr_b: str

    def run_in(self, ns: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread that entered namespace ``ns``; sockets it creates stay in
        that namespace for their whole life.
        """
        out: list[T] = []
        err: list[BaseException] = []

        def target() -> None:
            try:
                with open(f"/run/netns/{ns}") as f:
                    if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, f"setns({ns}): {os.strerror(e)}")
                out.append(fn())
            except BaseException as exc:
                err.append(exc)

        t = threading.Thread(target=target)
        t.start()
        t.join()
        if err:
            raise err[0]
        return out[0]

    def tcp_socket(self, ns: str, bind: tuple[str, int] | None = None) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if bind is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(bind)
            return s

        return self.run_in(ns, make)


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """Two network namespaces made by this test, joined by a veth pair with a private /30
    that exists only inside them. Skips (with the reason) when namespaces are not permitted.
    """
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"netns: {reason}")
    with Netns.create() as a, Netns.create() as b:
        veth = veth_between(a, b)
        yield TwoHosts(a=a.name, b=b.name, addr_a=veth.host_addr, addr_b=veth.peer_addr)
