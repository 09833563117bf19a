"""The RDMA transport where RDMA is missing, and its pieces that need no device.

Runs on any host (no pyverbs, no device needed): the errors a user sees without RDMA, port
and GID selection from a fake sysfs tree, the setup message codec, the ring geometry.
The real data path is tested inside the soft-RoCE guest (test_in_guest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qmpshadow.errors import ConfigError, TransportError
from qmpshadow.transport import _verbs, rdma
from qmpshadow.transport._verbs import RdmaUnavailableError, find_port


@pytest.fixture
def no_rdma(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty /sys/class/infiniband, whatever this host has."""
    sysfs = tmp_path / "infiniband"
    sysfs.mkdir()
    monkeypatch.setattr(_verbs, "SYSFS", sysfs)
    return sysfs


def _port(sysfs: Path, dev: str, *, state: str = "4: ACTIVE",
          gids: dict[int, tuple[str, str]] | None = None, link_layer: str = "Ethernet") -> None:
    pdir = sysfs / dev / "ports" / "1"
    (pdir / "gids").mkdir(parents=True)
    (pdir / "gid_attrs" / "types").mkdir(parents=True)
    (pdir / "state").write_text(state + "\n")
    (pdir / "link_layer").write_text(link_layer + "\n")
    (pdir / "lid").write_text("0x0\n")
    for i in range(4):
        gid, kind = (gids or {}).get(i, ("0000:0000:0000:0000:0000:0000:0000:0000", ""))
        (pdir / "gids" / str(i)).write_text(gid + "\n")
        (pdir / "gid_attrs" / "types" / str(i)).write_text(kind + "\n")


LINK_LOCAL = "fe80:0000:0000:0000:0200:00ff:fe00:0000"
MAPPED = "0000:0000:0000:0000:0000:ffff:7f00:0001"


async def test_connect_and_listen_without_a_device_say_so(no_rdma: Path) -> None:
    """Before any connection is made: the message says there is no device and names
    --transport tcp; it is a ConfigError, so reconnect() does not retry it."""
    for call in (rdma.connect("127.0.0.1", 9, insecure_loopback=True),
                 rdma.listen("127.0.0.1", 0, insecure_loopback=True)):
        with pytest.raises(RdmaUnavailableError) as info:
            await call
        msg = str(info.value)
        assert "no RDMA device" in msg and "--transport tcp" in msg, msg
        assert "rdma_rxe" in msg  # how to get soft-RoCE
        assert isinstance(info.value, ConfigError)
    assert rdma.available() == "no RDMA device (/sys/class/infiniband is empty)"


def test_host_without_rdma_never_imports_pyverbs(no_rdma: Path) -> None:
    assert rdma.available() is not None
    with pytest.raises(RdmaUnavailableError):
        find_port()
    if _verbs._loaded is None:
        assert "pyverbs" not in sys.modules


def test_missing_pyverbs_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_verbs, "_loaded", None)
    monkeypatch.setitem(sys.modules, "pyverbs", None)  # import fails
    with pytest.raises(RdmaUnavailableError, match="python3-pyverbs") as info:
        _verbs.load()
    assert "--transport tcp" in str(info.value)


def test_port_and_gid_selection(no_rdma: Path) -> None:
    # first device has its port down; second: link-local RoCE v1/v2 and an IPv4-mapped v2
    _port(no_rdma, "rxe0", state="1: DOWN")
    _port(no_rdma, "rxe1", gids={0: (LINK_LOCAL, "IB/RoCE v1"), 1: (LINK_LOCAL, "RoCE v2"),
                                 2: (MAPPED, "IB/RoCE v1"), 3: (MAPPED, "RoCE v2")})
    port = find_port()
    assert (port.device, port.port, port.gid_index) == ("rxe1", 1, 3)
    assert _verbs.gid_text(port.gid) == "::ffff:127.0.0.1"
    assert str(port) == "rxe1/1 gid[3] ::ffff:127.0.0.1"
    assert find_port(gid_index=1).gid_index == 1
    with pytest.raises(RdmaUnavailableError, match="rxe0/1 is 1: DOWN, not ACTIVE"):
        find_port("rxe0")
    with pytest.raises(RdmaUnavailableError, match="GID index 5 is empty") as info:
        find_port("rxe1", gid_index=5)
    assert "devices here: rxe0, rxe1" in str(info.value)
    with pytest.raises(RdmaUnavailableError, match="mlx5_0 has no port 1"):
        find_port("mlx5_0")


def test_gid_fallbacks(no_rdma: Path) -> None:
    _port(no_rdma, "rxe0", gids={0: (LINK_LOCAL, "IB/RoCE v1"), 1: (LINK_LOCAL, "RoCE v2")})
    assert find_port().gid_index == 1  # no IPv4-mapped GID: the first RoCE v2 one
    _port(no_rdma, "mlx4_0", link_layer="InfiniBand", gids={0: (LINK_LOCAL, "IB/RoCE v1")})
    assert find_port("mlx4_0").gid_index == 0  # InfiniBand: index 0
    _port(no_rdma, "rxe9", gids={0: (LINK_LOCAL, "IB/RoCE v1")})
    with pytest.raises(RdmaUnavailableError, match="no RoCE v2 GID"):
        find_port("rxe9")


def _params(**kw: int) -> rdma._Params:
    base = dict(qpn=17, psn=0xABCDE, ring_addr=0x7F00_1234_5000, rkey=0x1234, slot_size=128 << 10,
                slots=8, lid=0, mtu=5)
    base.update(kw)
    return rdma._Params(gid=bytes(10) + b"\xff\xff\x7f\x00\x00\x01", **base)


def test_setup_message_round_trip_and_checks() -> None:
    p = _params()
    text = p.encode()
    assert text.startswith("qsrdma/1 params ") and len(text.encode()) <= 255  # fits HELLO
    assert rdma._Params.decode(text, "peer") == p
    with pytest.raises(TransportError, match="not an RDMA endpoint"):
        rdma._Params.decode("vm1", "peer")
    with pytest.raises(TransportError, match="malformed"):
        rdma._Params.decode("qsrdma/1 params zz", "peer")
    bad = _params(qpn=0, slots=0, slot_size=100, mtu=9).encode()
    with pytest.raises(TransportError, match=r"QPN 0, slot size 100, 0 slots, MTU code 9"):
        rdma._Params.decode(bad, "peer")


@pytest.mark.parametrize(("read_buffer", "geometry"), [
    (1 << 20, (8, 128 << 10)),
    (64 << 10, (8, 8 << 10)),
    (4096, (2, 4096)),
    (16 << 20, (16, 1 << 20)),
    (1 << 30, (256, 1 << 20)),
])
def test_ring_geometry(read_buffer: int, geometry: tuple[int, int]) -> None:
    assert rdma.ring_geometry(read_buffer) == geometry
