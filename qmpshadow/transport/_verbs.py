"""A small typed wrapper over pyverbs for :mod:`qmpshadow.transport.rdma` (imported lazily).

pyverbs is rdma-core's Cython binding of libibverbs. Install Debian's ``python3-pyverbs``
(PyPI's pyverbs 59.0 does not build with Cython 3.3); it ships no type information, so
everything untyped stays in this module: :class:`Endpoint` owns one device context, a
protection domain, a completion channel and queue, one RC queue pair and two registered
buffers (the receive ring the peer writes into, and the staging area this side sends from),
and exposes only what the link needs, typed.

Device and port discovery reads sysfs (``/sys/class/infiniband``) and does not import
pyverbs, so ``qmpshadow`` imports and runs its other transports on hosts without RDMA.

The completion channel's file descriptor is not exposed by pyverbs; :class:`Endpoint`
finds it as the one ``anon_inode:[infinibandevent]`` descriptor that appeared while the
channel was created, makes it non-blocking and hands it to the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import mmap
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from qmpshadow.errors import ConfigError, TransportError

__all__ = [
    "Completion",
    "Endpoint",
    "PortInfo",
    "RdmaUnavailableError",
    "devices",
    "find_port",
    "load",
]

SYSFS: Final = Path("/sys/class/infiniband")
#: What every message about a missing RDMA stack suggests instead.
USE_TCP: Final = "use --transport tcp (TCP with mutual TLS) instead"

# Opcodes and statuses of libibverbs (stable ABI values, checked against pyverbs at load).
WC_SEND: Final = 0
WC_RDMA_WRITE: Final = 1
WC_RECV: Final = 128
WC_RECV_RDMA_WITH_IMM: Final = 129
WC_SUCCESS: Final = 0
WC_WR_FLUSH_ERR: Final = 5

#: libibverbs' enum ibv_mtu -> bytes.
MTU_BYTES: Final = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}


class RdmaUnavailableError(ConfigError):
    """RDMA cannot be used on this host: pyverbs is not installed, there is no RDMA
    device, or the chosen device/port/GID does not exist or is not active. Retrying does
    not help; the message says what is missing and names ``--transport tcp``.
    """


# ---------------------------------------------------------------------------------------------
# Loading pyverbs


@dataclass(frozen=True, slots=True)
class _Pyverbs:
    enums: Any
    device: Any
    pd: Any
    cq: Any
    qp: Any
    mr: Any
    wr: Any
    addr: Any
    error: type[Exception]


_loaded: _Pyverbs | None = None
_load_lock = threading.Lock()


def load() -> _Pyverbs:
    """Import pyverbs once. Raises RdmaUnavailableError when it is not installed."""
    global _loaded
    with _load_lock:
        if _loaded is not None:
            return _loaded
        try:
            mods: list[ModuleType] = []
            for name in ("enums", "device", "pd", "cq", "qp", "mr", "wr", "addr",
                         "pyverbs_error"):
                mods.append(__import__(f"pyverbs.{name}", fromlist=["_"]))
        except ImportError as exc:
            raise RdmaUnavailableError(
                f"the RDMA transport needs pyverbs, which cannot be imported ({exc}): on "
                "Debian install python3-pyverbs (and run qmpshadow with that python3, or a "
                f"venv made with --system-site-packages); or {USE_TCP}"
            ) from None
        enums, device, pd, cq, qp, mr, wr, addr, err = mods
        for name, want in (("IBV_WC_SEND", WC_SEND), ("IBV_WC_RDMA_WRITE", WC_RDMA_WRITE),
                           ("IBV_WC_RECV", WC_RECV),
                           ("IBV_WC_RECV_RDMA_WITH_IMM", WC_RECV_RDMA_WITH_IMM),
                           ("IBV_WC_SUCCESS", WC_SUCCESS),
                           ("IBV_WC_WR_FLUSH_ERR", WC_WR_FLUSH_ERR)):
            if getattr(enums, name) != want:
                raise RdmaUnavailableError(
                    f"this pyverbs defines {name} = {getattr(enums, name)}, expected {want}: "
                    f"unsupported rdma-core; {USE_TCP}"
                )
        _loaded = _Pyverbs(enums=enums, device=device, pd=pd, cq=cq, qp=qp, mr=mr, wr=wr,
                           addr=addr, error=err.PyverbsError)
        return _loaded


# ---------------------------------------------------------------------------------------------
# Devices and ports (sysfs only)


def devices() -> list[str]:
    """Names of the RDMA devices of this host (``/sys/class/infiniband``), sorted."""
    try:
        return sorted(p.name for p in SYSFS.iterdir())
    except OSError:
        return []


@dataclass(frozen=True, slots=True)
class PortInfo:
    """The local end: device, port, the GID used (index and 16 raw bytes), active MTU."""

    device: str
    port: int
    gid_index: int
    gid: bytes
    lid: int
    link_layer: str

    def __str__(self) -> str:
        return f"{self.device}/{self.port} gid[{self.gid_index}] {gid_text(self.gid)}"


def gid_text(gid: bytes) -> str:
    """A GID as an IPv6 address (IPv4-mapped ones print as ::ffff:a.b.c.d)."""
    addr = ipaddress.IPv6Address(gid)
    return f"::ffff:{addr.ipv4_mapped}" if addr.ipv4_mapped else str(addr)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _no_device(what: str) -> RdmaUnavailableError:
    found = devices()
    have = f"devices here: {', '.join(found)}" if found else "this host has no RDMA device"
    return RdmaUnavailableError(
        f"{what} ({have}; soft-RoCE: modprobe rdma_rxe && rdma link add rxe0 type rxe "
        f"netdev IFACE); {USE_TCP}"
    )


def find_port(device: str | None = None, port: int = 1, gid_index: int | None = None
              ) -> PortInfo:
    """The port to use: ``device`` (default: the first device with an ACTIVE ``port``) and
    ``gid_index`` (default: the first RoCE v2 IPv4-mapped GID, else the first RoCE v2
    GID, else index 0 on InfiniBand).

    Raises RdmaUnavailableError when there is no such device, the port is not ACTIVE or
    has no usable GID.
    """
    names = [device] if device is not None else devices()
    if not names:
        raise _no_device("no RDMA device found for the RDMA transport")
    problems: list[str] = []
    for name in names:
        pdir = SYSFS / name / "ports" / str(port)
        if not pdir.is_dir():
            problems.append(f"{name} has no port {port}")
            continue
        state = _read(pdir / "state")
        if "ACTIVE" not in state:
            problems.append(f"{name}/{port} is {state or 'in an unknown state'}, not ACTIVE")
            continue
        link_layer = _read(pdir / "link_layer") or "Ethernet"
        try:
            index, gid = _choose_gid(pdir, gid_index, link_layer)
        except LookupError as exc:
            problems.append(f"{name}/{port}: {exc}")
            continue
        lid = int(_read(pdir / "lid") or "0", 0)
        return PortInfo(device=name, port=port, gid_index=index, gid=gid, lid=lid,
                        link_layer=link_layer)
    raise _no_device("no usable RDMA port: " + "; ".join(problems))


def _gid_at(pdir: str, i: int) -> bytes | None:
    """The GID at index ``i`` (None when empty or unreadable)."""
    try:
        with open(f"{pdir}/gids/{i}") as f:
            raw = socket.inet_pton(socket.AF_INET6, f.read().strip())  # 8 groups of 4 hex
    except OSError:
        return None
    return None if raw == bytes(16) else raw


def _gid_type(pdir: str, i: int) -> str:
    try:
        with open(f"{pdir}/gid_attrs/types/{i}") as f:
            return f.read().strip()
    except OSError:
        return ""


_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"


def _choose_gid(pdir_path: Path, gid_index: int | None, link_layer: str) -> tuple[int, bytes]:
    # A GID table has up to 1024 entries (each a sysfs file): read them in order and stop
    # at the first one that fits, rather than all of them.
    pdir = str(pdir_path)
    if gid_index is not None:
        raw = _gid_at(pdir, gid_index)
        if raw is None:
            raise LookupError(f"GID index {gid_index} is empty")
        return gid_index, raw
    try:
        size = len(os.listdir(f"{pdir}/gids"))
    except OSError:
        size = 0
    infiniband = link_layer.lower() == "infiniband"
    first_v2: tuple[int, bytes] | None = None
    for i in range(size):
        raw = _gid_at(pdir, i)
        if raw is None:
            continue
        if infiniband:
            return i, raw
        if "v2" in _gid_type(pdir, i).lower():
            if raw[:12] == _MAPPED_PREFIX:
                return i, raw
            first_v2 = first_v2 or (i, raw)
    if first_v2 is not None:
        return first_v2
    raise LookupError("no RoCE v2 GID (does the netdev have an IP address?)")


# ---------------------------------------------------------------------------------------------
# Completions


@dataclass(frozen=True, slots=True)
class Completion:
    """One work completion: ``imm`` is the immediate value in host order (0 if none)."""

    wr_id: int
    status: int
    opcode: int
    byte_len: int
    imm: int
    vendor_err: int
    status_text: str


# ---------------------------------------------------------------------------------------------
# Endpoint

_FD_LOCK = threading.Lock()
_EVENT_INODE: Final = "anon_inode:[infinibandevent]"


def _event_fds() -> set[int]:
    out: set[int] = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == _EVENT_INODE:
                out.add(int(name))
        except OSError:
            continue
    return out


class _Buffer:
    """Anonymous, page-aligned memory with its address (for registration)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(anchor)
        del anchor
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):  # a slice still exported: the GC unmaps it
            self.map.close()


def _wrap(what: str, exc: Exception) -> TransportError:
    return TransportError(f"RDMA {what} failed: {exc}")


class Endpoint:
    """Verbs resources of one link end. Not thread-safe; used from the event loop only.

    ``ring_slots`` x ``slot_size`` bytes are registered for remote writes (the peer's data
    lands there); :meth:`register_send` registers the staging area for local use (what this
    side sends is copied there), once the peer's slot size is known. Raises
    RdmaUnavailableError when the device cannot be opened and TransportError when a verbs
    call fails.
    """

    def __init__(self, port: PortInfo, *, ring_slots: int, slot_size: int,
                 max_send_wr: int, max_recv_wr: int) -> None:
        p = self._p = load()
        e = p.enums
        self.port = port
        self.psn = secrets.randbits(24)
        self._closed = False
        self._ctx: Any = None
        self._channel: Any = None
        self.fd = -1
        self.ring = _Buffer(ring_slots * slot_size)
        # pyverbs wants an SGE in every work request, even where nothing is transferred
        self.scratch = _Buffer(4096)
        self.send_buf: _Buffer | None = None
        self.send_mr: Any = None
        try:
            try:
                self._ctx = p.device.Context(name=port.device)
            except p.error as exc:
                raise RdmaUnavailableError(
                    f"cannot open RDMA device {port.device}: {exc}; is ib_uverbs loaded and "
                    f"/dev/infiniband accessible? Otherwise {USE_TCP}"
                ) from None
            attr = self._ctx.query_port(port.port)
            if attr.state != e.IBV_PORT_ACTIVE:
                raise RdmaUnavailableError(
                    f"RDMA port {port.device}/{port.port} is not ACTIVE; {USE_TCP}"
                )
            self.mtu = int(attr.active_mtu)
            self.pd = p.pd.PD(self._ctx)
            with _FD_LOCK:
                before = _event_fds()
                self._channel = p.cq.CompChannel(self._ctx)
                new = _event_fds() - before
            if len(new) != 1:
                raise TransportError(
                    f"cannot identify the completion channel's file descriptor (new event "
                    f"descriptors: {sorted(new)}): another thread created one at the same time?"
                )
            self.fd = new.pop()
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            self.cq = p.cq.CQ(self._ctx, max_send_wr + max_recv_wr + 16, None, self._channel, 0)
            cap = p.qp.QPCap(max_send_wr=max_send_wr, max_recv_wr=max_recv_wr,
                             max_send_sge=1, max_recv_sge=1)
            init = p.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap,
                                   sq_sig_all=0)
            self.qp = p.qp.QP(self.pd, init)
            self.qpn = int(self.qp.qp_num)
            self.scratch_mr = p.mr.MR(self.pd, self.scratch.size, e.IBV_ACCESS_LOCAL_WRITE,
                                      address=self.scratch.addr)
            self.ring_mr = p.mr.MR(self.pd, self.ring.size,
                                   e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE,
                                   address=self.ring.addr)
            self.cq.req_notify()
            self._build_wrs()
        except p.error as exc:
            self.close()
            raise _wrap("setup", exc) from None
        except BaseException:
            self.close()
            raise

    def register_send(self, size: int) -> memoryview:
        """Register ``size`` bytes to send from; returns them. Raises TransportError."""
        p = self._p
        buf = _Buffer(size)
        try:
            self.send_mr = p.mr.MR(self.pd, size, p.enums.IBV_ACCESS_LOCAL_WRITE,
                                   address=buf.addr)
        except p.error as exc:
            buf.close()
            raise _wrap("registering the send buffer", exc) from None
        self.send_buf = buf
        self._send_addr = buf.addr
        try:
            self._data_sge = p.wr.SGE(buf.addr, 0, self.send_mr.lkey)
            self._data_wr = p.wr.SendWR(opcode=p.enums.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                                        sg=[self._data_sge])
            self._data_wr.sg_list = self._data_sge
        except p.error as exc:
            raise _wrap("building work requests", exc) from None
        return buf.view

    @property
    def ring_rkey(self) -> int:
        return int(self.ring_mr.rkey)

    @property
    def ring_addr(self) -> int:
        return self.ring.addr

    def connect(self, *, qpn: int, psn: int, gid: bytes, lid: int, mtu: int) -> None:
        """Move the queue pair to RTS towards the remote one. Raises TransportError."""
        p = self._p
        e = p.enums
        try:
            attr = p.qp.QPAttr()
            attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
            attr.pkey_index = 0
            attr.port_num = self.port.port
            attr.path_mtu = min(mtu, self.mtu)
            attr.dest_qp_num = qpn
            attr.rq_psn = psn
            attr.max_dest_rd_atomic = 1
            attr.min_rnr_timer = 12
            gr = p.addr.GlobalRoute(dgid=p.addr.GID(_gid_groups(gid)),
                                    sgid_index=self.port.gid_index, hop_limit=64)
            attr.ah_attr = p.addr.AHAttr(port_num=self.port.port, is_global=1, gr=gr,
                                         dlid=lid, sl=0)
            attr.sq_psn = self.psn
            attr.timeout = 14  # 4.096 us * 2^14 = 67 ms per try
            attr.retry_cnt = 7
            attr.rnr_retry = 7  # the receiver reposts receives as it polls: wait for it
            attr.max_rd_atomic = 1
            self.qp.to_rts(attr)
        except p.error as exc:
            raise _wrap("queue pair connection (INIT -> RTR -> RTS)", exc) from None

    # -- posting -----------------------------------------------------------------------------

    # Work requests are built once and re-posted with new fields (ibv_post_* copies them into
    # the queue): creating pyverbs WR/SGE objects costs a logger lookup each and pyverbs 44
    # never frees their C memory. The data WR's scatter list is pointed at its SGE's own
    # struct (pyverbs' ``sg_list`` setter), so that address and length can change per post;
    # both objects live as long as the endpoint and are never closed (nothing is freed twice).

    def _build_wrs(self) -> None:
        p = self._p
        e = p.enums
        lkey = self.scratch_mr.lkey
        self._recv_wr = p.wr.RecvWR(wr_id=0, num_sge=1,
                                    sg=[p.wr.SGE(self.scratch.addr, 64, lkey)])
        self._imm_sge = p.wr.SGE(self.scratch.addr + 2048, 0, lkey)
        self._imm_wr = p.wr.SendWR(opcode=e.IBV_WR_SEND_WITH_IMM, num_sge=1,
                                   sg=[self._imm_sge])
        self._fence_sge = p.wr.SGE(self.scratch.addr + 2048, 0, lkey)
        self._fence_wr = p.wr.SendWR(opcode=e.IBV_WR_RDMA_WRITE, num_sge=1,
                                     sg=[self._fence_sge])
        self._signaled = e.IBV_SEND_SIGNALED

    def post_recv(self, wr_id: int) -> None:
        """Post one receive (RDMA WRITE WITH IMM and 0-byte SEND place nothing in it)."""
        p = self._p
        try:
            self._recv_wr.wr_id = wr_id
            self.qp.post_recv(self._recv_wr)
        except p.error as exc:
            raise _wrap("post_recv", exc) from None

    def post_write_imm(self, wr_id: int, offset: int, length: int, remote_addr: int,
                       rkey: int, imm: int, *, signaled: bool) -> None:
        """RDMA WRITE WITH IMM of ``send_buf[offset:offset+length]`` to ``remote_addr``."""
        p = self._p
        sge, wr = self._data_sge, self._data_wr
        try:
            sge.addr = self._send_addr + offset
            sge.length = length
            wr.wr_id = wr_id
            wr.imm_data = socket.htonl(imm)
            wr.send_flags = self._signaled if signaled else 0
            wr.set_wr_rdma(rkey, remote_addr)
            self.qp.post_send(wr)
        except p.error as exc:
            raise _wrap("post_send (RDMA WRITE WITH IMM)", exc) from None

    def post_send_imm(self, wr_id: int, imm: int, *, signaled: bool) -> None:
        """A 0-byte SEND WITH IMM (a control value for the peer, e.g. credits)."""
        p = self._p
        wr = self._imm_wr
        try:
            wr.wr_id = wr_id
            wr.imm_data = socket.htonl(imm)
            wr.send_flags = self._signaled if signaled else 0
            self.qp.post_send(wr)
        except p.error as exc:
            raise _wrap("post_send (SEND WITH IMM)", exc) from None

    def post_fence(self, wr_id: int, remote_addr: int, rkey: int) -> None:
        """A signaled 0-byte RDMA WRITE: its completion retires every earlier work request
        (the peer sees nothing: no receive is consumed).
        """
        p = self._p
        wr = self._fence_wr
        try:
            wr.wr_id = wr_id
            wr.send_flags = self._signaled
            wr.set_wr_rdma(rkey, remote_addr)
            self.qp.post_send(wr)
        except p.error as exc:
            raise _wrap("post_send (RDMA WRITE)", exc) from None

    # -- completions -------------------------------------------------------------------------

    def take_event(self) -> bool:
        """Read and acknowledge one completion event (the channel was readable), re-arm the
        CQ; returns whether there was one. Raises TransportError when re-arming fails.

        One arming yields at most one event, and the CQ is re-armed here before the caller
        polls it empty: a completion after that poll raises the next event.
        """
        p = self._p
        got = True
        try:
            self._channel.get_cq_event(self.cq)
        except p.error as exc:
            if getattr(exc, "error_code", None) not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise _wrap("get_cq_event", exc) from None
            got = False  # spurious wake-up
        if got:
            self.cq.ack_events(1)
        try:
            self.cq.req_notify()
        except p.error as exc:
            raise _wrap("req_notify_cq", exc) from None
        return got

    def poll(self, limit: int = 64) -> list[Completion]:
        """Up to ``limit`` completions. Raises TransportError when polling fails."""
        p = self._p
        try:
            _, wcs = self.cq.poll(limit)
        except p.error as exc:
            raise _wrap("poll_cq", exc) from None
        out: list[Completion] = []
        for wc in wcs:
            status = int(wc.status)
            text = "success" if status == WC_SUCCESS else str(p.cq.cqe_status_to_str(status))
            out.append(Completion(wr_id=int(wc.wr_id), status=status, opcode=int(wc.opcode),
                                  byte_len=int(wc.byte_len),
                                  imm=socket.ntohl(int(wc.imm_data) & 0xFFFFFFFF),
                                  vendor_err=int(wc.vendor_err), status_text=text))
        return out

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the queue pair, queues, registrations and the device context (in that
        order: nothing can write into the buffers once this returns). Idempotent; never
        raises.
        """
        if self._closed:
            return
        self._closed = True
        for name in ("qp", "ring_mr", "send_mr", "scratch_mr", "cq", "_channel", "pd", "_ctx"):
            obj = getattr(self, name, None)
            if obj is None:
                continue
            with contextlib.suppress(Exception):  # teardown goes on; no one to report to
                obj.close()
            setattr(self, name, None)
        self.fd = -1
        self.ring.close()
        self.scratch.close()
        if self.send_buf is not None:
            self.send_buf.close()


def _gid_groups(gid: bytes) -> str:
    """16 raw bytes as pyverbs' GID text: 8 colon-separated groups of 4 hex digits."""
    h = gid.hex()
    return ":".join(h[i : i + 4] for i in range(0, 32, 4))
