#!/usr/bin/env python3
"""Output commit: what holding the guest's frames until their epoch commits costs.

One run, one private LAN (a network namespace with a bridge; the peer is the namespace's
own stack), the Linux test guest (TCG, e1000-82545em with a 4096-frame receive ring,
128 MiB: small, so that the shared-RAM scan stays short) in ``lg.mode=serve``. For each
configuration, a fresh primary:

  none         no protection (the anchor)
  oc-20/50/200 `qmpshadow protect` (shared-RAM source) + `qmpshadow shadow` on a unix link,
               output_commit = "on", fixed epochs of 20, 50, 200 ms
  oc-adaptive  the same with the adaptive policy (--epoch-min-ms 20 --epoch-max-ms 200)

measured from the peer: ping RTT (``ping -i 0.1``), TCP throughput guest → peer (the peer
reads what the guest's port 5001 sends) and peer → guest (the peer writes to port 5002;
bytes counted once acknowledged: sent minus the socket's unacknowledged queue). Last line:

  RESULT tcp_ratio_50ms=<lower of the two directions' ratio to none> rtt_ms_50ms=<avg>
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import itertools
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GUEST = "10.77.0.2"
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # Linux; the socket module does not name them


def _cksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(count: int, interval: float, wait: float) -> None:
    """Runs inside the namespace: ICMP echo (raw socket; the host has no ping binary), one
    request every ``interval`` without waiting for replies; prints RTTs and losses."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(0.01)
    ident = 0x5153
    sent: dict[int, float] = {}
    rtts: dict[int, float] = {}
    t_end = time.monotonic() + count * interval + wait
    nxt = time.monotonic()
    seq = 0
    while time.monotonic() < t_end and len(rtts) < count:
        if seq < count and time.monotonic() >= nxt:
            body = struct.pack(">BBHHH", 8, 0, 0, ident, seq) + b"qmpshadow-bench"
            body = body[:2] + _cksum(body).to_bytes(2, "big") + body[4:]
            sent[seq] = time.monotonic()
            s.sendto(body, (GUEST, 0))
            seq += 1
            nxt += interval
        try:
            pkt = s.recv(2048)
        except TimeoutError:
            continue
        icmp = pkt[(pkt[0] & 0xF) * 4 :]
        if len(icmp) >= 8 and icmp[0] == 0:
            rid, rseq = struct.unpack_from(">HH", icmp, 4)
            if rid == ident and rseq in sent and rseq not in rtts:
                rtts[rseq] = (time.monotonic() - sent[rseq]) * 1000
    print(json.dumps({"rtts": list(rtts.values()), "sent": seq}))


def client(mode: str, seconds: float, diag: bool = False, cc: str = "",
           sock_buf: int = 0) -> None:
    """Runs inside the namespace: one TCP measurement, prints {"mbit": ...}."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if cc:  # per socket: this host's /proc/sys is read-only in the namespace
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    if sock_buf:  # the *FORCE variants pass net.core.[rw]mem_max (root); before connect,
        # so that the window scale covers it
        s.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE if mode == "to-guest"
                     else _SO_RCVBUFFORCE, sock_buf)
    s.settimeout(10)
    s.connect((GUEST, 5001 if mode == "from-guest" else 5002))
    s.settimeout(2.0)
    t0 = time.monotonic()
    n = 0
    ss_at, ss_out = t0 + seconds * 0.8, ""
    # --diag: the peer's cwnd / ssthresh / rtt every 0.2 s for 3 s, then every second
    # (where slow start ended, and why, decides this run's figure)
    trail: list[str] = []
    trail_at = t0 + 0.2
    # --diag, guest -> peer: the guest's sending socket (its cwnd and ssthresh) every
    # 0.5 s, read over port 5003 from a thread (the reply is held like any output)
    gtrail: list[str] = []
    stop = threading.Event()
    if diag and mode == "from-guest":
        threading.Thread(target=_guest_trail, args=(t0, stop, gtrail), daemon=True).start()
    buf = b"\0" * (1 << 16)
    while (now := time.monotonic()) - t0 < seconds:
        if diag and not ss_out and now >= ss_at:
            ss_out = _ss()
        if diag and now >= trail_at:
            trail.append(f"{now - t0:.1f}s {_ss_brief(_ss())}")
            trail_at += 0.2 if now - t0 < 3 else 1.0
        try:
            if mode == "from-guest":
                n += len(s.recv(1 << 16))
            else:
                n += s.send(buf)
        except TimeoutError:
            continue
    if mode != "from-guest":
        outq = fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        n -= int.from_bytes(outq, sys.byteorder)
    stop.set()
    print(json.dumps({"mbit": n * 8 / (now - t0) / 1e6, "bytes": n, "ss": ss_out,
                      "trail": trail, "guest_trail": gtrail}))
    s.close()


def _guest_trail(t0: float, stop: threading.Event, out: list[str]) -> None:
    """The guest's port-5001 socket out of its /proc/net/tcp or tcp6: tx_queue (bytes
    written and not yet acknowledged, sent or not), snd_cwnd and ssthresh (-1: still in
    slow start)."""
    while not stop.wait(0.5):
        try:
            text = _guest_text()
        except OSError as exc:
            out.append(f"{time.monotonic() - t0:.1f}s ({exc})")
            continue
        for line in text.splitlines():
            f = line.split()
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref ptr rto ato
            # qack cwnd ssthresh
            if len(f) >= 17 and f[1].endswith(":1389") and f[3] == "01":
                out.append(f"{time.monotonic() - t0:.1f}s txq:{int(f[4].split(':')[0], 16)}"
                           f" cwnd:{f[15]} ssthresh:{f[16]}")


def _ss() -> str:
    """The peer's view of the measured connection (``ss -tin``, --diag): cwnd, rtt,
    the peer's send window, rwnd_limited / sndbuf_limited, retransmits."""
    r = subprocess.run(["ss", "-tin", "dst", GUEST], capture_output=True, text=True,
                       check=False)
    return " ".join(r.stdout.split())


def _ss_brief(text: str) -> str:
    """cwnd, ssthresh, rtt/var, minrtt and retransmits out of one ``ss -tin`` line."""
    keep = ("cwnd:", "ssthresh:", "rtt:", "minrtt:", "retrans:", "lost:", "reord_seen:",
            "dsack_dups:", "rwnd_limited:")
    return " ".join(f for f in text.split() if f.startswith(keep)) or "-"


def guest_stats() -> None:
    """Runs inside the namespace: prints the guest's port 5003 (its /proc/net/snmp,
    netstat, dev and tcp_* sysctls)."""
    print(_guest_text())


def _guest_text() -> str:
    with socket.create_connection((GUEST, 5003), timeout=10) as s:
        s.settimeout(10)
        chunks = []
        while data := s.recv(1 << 16):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def _counters(text: str) -> dict[str, int]:
    """``Proto: names`` / ``Proto: values`` line pairs (/proc/net/snmp, netstat) and
    ``nstat -az`` lines → {"TcpExtTCPLostRetransmit": n, ...}."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for a, b in itertools.pairwise(lines):
        ha, _, ra = a.partition(":")
        hb, _, rb = b.partition(":")
        if ha == hb and ra and not ra.split()[0].lstrip("-").isdigit():
            for k, v in zip(ra.split(), rb.split(), strict=False):
                if v.lstrip("-").isdigit():
                    out[ha + k] = int(v)
    for line in lines:
        f = line.split()
        if len(f) >= 2 and f[0][:1].isalpha() and f[1].isdigit() and ":" not in f[0]:
            out.setdefault(f[0], int(f[1]))
        # /proc/net/dev: "eth0: rx bytes packets errs drop fifo frame compressed multicast
        # | tx ..." (frames the NIC or its driver lost on the way in)
        if len(f) >= 6 and f[0] == "eth0:" and all(x.isdigit() for x in f[1:6]):
            out.update(Eth0RxErrs=int(f[3]), Eth0RxDrop=int(f[4]), Eth0RxFifo=int(f[5]))
    return out


_DIAG_KEYS = ("TcpRetransSegs", "TcpExtTCPLostRetransmit", "TcpExtTCPLossProbes",
              "TcpExtTCPTimeouts", "TcpExtTCPSackRecovery", "TcpExtTCPFastRetrans",
              "TcpExtTCPBacklogDrop", "TcpExtTCPRcvQDrop", "TcpExtTCPOFOQueue",
              "TcpExtTCPOFODrop", "TcpExtPruneCalled", "TcpExtTCPRcvCollapsed",
              "TcpExtTCPDSACKRecv", "TcpExtTCPDSACKOldSent", "TcpExtTCPSpuriousRTOs",
              "IpExtInNoRoutes", "TcpInSegs", "TcpOutSegs", "TcpExtTCPWantZeroWindowAdv",
              "TcpExtTCPFromZeroWindowAdv", "TcpExtTCPToZeroWindowAdv", "Eth0RxErrs",
              "Eth0RxDrop", "Eth0RxFifo", "eth0_rx_dropped", "eth0_rx_missed_errors",
              "eth0_rx_over_errors", "eth0_rx_fifo_errors", "softnet_dropped",
              "TcpExtTCPHystartTrainDetect", "TcpExtTCPHystartTrainCwnd",
              "TcpExtTCPHystartDelayDetect", "TcpExtTCPHystartDelayCwnd",
              "TcpExtTCPMemoryPressures", "TcpExtTCPMemoryPressuresChrono")


async def snapshot(lan: Any, tap: str) -> dict[str, Any]:
    """--diag: the peer's nstat, the guest's counters, the tap's ip -s link."""
    peer = await asyncio.to_thread(lan.ns.run, ["nstat", "-az"], check=False, timeout=20)
    guest = await asyncio.to_thread(lan.ns.run, [sys.executable, __file__, "--client",
                                                 "stats"], check=False, timeout=30)
    link = await asyncio.to_thread(lan.ns.run, ["ip", "-s", "-s", "link", "show", tap],
                                   check=False, timeout=20)
    g = _counters(guest.stdout)
    sysctl = {x.split()[0]: " ".join(x.split()[1:]) for x in guest.stdout.splitlines()
              if x.startswith("tcp_")}
    return {"peer": _counters(peer.stdout), "guest": g, "sysctl": sysctl,
            "link": " ".join(link.stdout.split())}


def print_diff(tag: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    for side in ("peer", "guest"):
        d = {k: b[side].get(k, 0) - a[side].get(k, 0) for k in _DIAG_KEYS}
        print(f"    {tag} {side}: " + " ".join(f"{k.removeprefix('TcpExt')}={v}"
                                                for k, v in d.items() if v))
    print(f"    {tag} tap: {b['link']}")


async def ping_from(lan: Any, count: int, wait: float) -> dict[str, Any]:
    """Pings from inside the namespace (this script's --client ping)."""
    r = await asyncio.to_thread(lan.ns.run, [sys.executable, __file__, "--client", "ping",
                                             "--pings", str(count)],
                                check=False, timeout=count * 0.1 + wait + 30)
    try:
        doc: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"rtts": [], "sent": count, "error": r.stderr[-300:]}
    return doc


async def measure(lan: Any, seconds: float, pings: int, diag: bool = False,
                  tap: str = "", cc: str = "", buf: int = 0, settle: float = 0.0
                  ) -> dict[str, float]:
    out: dict[str, float] = {}
    doc = await ping_from(lan, pings, 3.0)
    rtts = doc["rtts"]
    out["rtt_ms"] = statistics.mean(rtts) if rtts else float("nan")
    out["rtt_max_ms"] = max(rtts) if rtts else float("nan")
    out["ping_loss_pct"] = 100.0 * (1 - len(rtts) / max(1, doc["sent"]))
    for mode in ("from-guest", "to-guest"):
        if mode == "to-guest":
            await asyncio.sleep(settle)
        before = await snapshot(lan, tap) if diag else {}
        r = await asyncio.to_thread(lan.ns.run, [sys.executable, __file__, "--client", mode,
                                                 "--seconds", str(seconds),
                                                 *(["--diag"] if diag else []),
                                                 "--peer-cc", cc, "--peer-buf", str(buf)],
                                    check=False, timeout=seconds + 60)
        try:
            doc = json.loads(r.stdout.strip().splitlines()[-1])
            out[mode] = float(doc["mbit"])
            if diag:
                print(f"  {mode}: {out[mode]:.1f} Mb/s; peer ss: {doc['ss']}")
                print("    peer trail: " + " | ".join(doc["trail"]))
                if doc.get("guest_trail"):
                    print("    guest trail: " + " | ".join(doc["guest_trail"]))
                after = await snapshot(lan, tap)
                print_diff(mode, before, after)
                if mode == "from-guest":
                    print(f"    guest sysctl: {after['sysctl']}")
        except (ValueError, IndexError, KeyError):
            print(f"  {mode}: measurement failed: {r.stdout[-300:]} {r.stderr[-300:]}")
            out[mode] = 0.0
    return out


async def run_config(name: str, root: Path, lan: Any, args: argparse.Namespace,
                     epoch: tuple[int, int] | None) -> dict[str, float]:
    from qmpshadow.qemu.argv import RunPaths, primary_argv
    from qmpshadow.qemu.process import QemuProcess
    from qmpshadow.qemu.spec import VmSpec
    from tests.faults.e2e import CLI, Agent
    from tests.faults.test_output_commit import GUEST_ARGS, write_net_spec

    tmp = root / name
    tmp.mkdir()
    spec_path = write_net_spec(tmp / "vm.toml", Path("/dev/shm") / f"qsbench-{root.name}-{name}",
                               output_commit=epoch is not None, tag=f"b{len(name)}{name[-2:]}",
                               mib=args.mib, kernel_args=f"{GUEST_ARGS} lg.mode=serve "
                               f"lg.mib=1 lg.delay=1 lg.tcpbuf={args.tcp_buf} "
                               f"lg.hystart={0 if args.no_hystart else 1} "
                               f"lg.rxdesc={args.rx_desc}", nic_model=args.nic_model)
    spec = VmSpec.from_toml(spec_path)
    run = RunPaths.create(tmp / "primary")
    vm = QemuProcess(primary_argv(spec, run, accel="tcg"), run, name=name, die_with_parent=True)
    await vm.start()
    agents: list[Agent] = []
    try:
        await asyncio.to_thread(lan.attach, spec.nics[0].ifname)
        if args.tap_qlen:
            await asyncio.to_thread(lan.ns.run, ["ip", "link", "set", spec.nics[0].ifname,
                                                 "txqueuelen", str(args.tap_qlen)])
        if epoch is not None:
            link = f"unix:{tmp / 'link.sock'}"
            shadow = Agent([*CLI, "shadow", "--spec", str(spec_path), "--replica",
                            str(tmp / "replica"), "--listen", link, "--accel", "tcg", "--json"],
                           tmp / "shadow.out")
            agents.append(shadow)
            await shadow.wait_event(lambda e: e.get("event") == "shadow-ready")
            source = Agent([*CLI, "protect", "--spec", str(spec_path), "--qmp",
                            str(run.qmp2_sock), "--to", link, "--interval", str(epoch[1]),
                            "--epoch-min-ms", str(epoch[0]), "--epoch-max-ms", str(epoch[1]),
                            "--ack-thinning", args.ack_thinning, "--json"], tmp / "source.out")
            agents.append(source)
            await shadow.wait_event(lambda e: e.get("event") == "committed"
                                    and e["epoch"] >= 3, timeout=60)
        # the guest serves once booted: wait until it answers
        deadline = time.monotonic() + 120
        while not (await ping_from(lan, 1, 2.0))["rtts"]:
            if time.monotonic() > deadline:
                tail = run.serial_log.read_text(errors="replace") if \
                    run.serial_log.exists() else "(no serial log)"
                tail = "\n".join(x for x in tail.splitlines() if "COUNTER" not in x)[-1500:]
                raise RuntimeError(f"{name}: the guest never answered a ping; serial:\n{tail}")
        await asyncio.sleep(2.0)  # its servers start right after the address
        res = await measure(lan, args.seconds, args.pings, args.diag, spec.nics[0].ifname,
                            args.peer_cc, args.peer_buf, args.settle)
        if args.diag:
            # the kernel's own complaints (a guest this small can run out of memory)
            log = vm.run.serial_log.read_text(errors="replace").splitlines()
            for x in [x for x in log if "COUNTER" not in x and "] " in x][-12:]:
                print(f"    guest console: {x[:160]}")
        if epoch is not None:
            eps = [e for e in agents[1].events() if e.get("event") == "epoch"]
            pauses = sorted(e["pause_ms"] for e in eps[-50:] if e.get("pause_ms"))
            res["pause_ms"] = pauses[len(pauses) // 2] if pauses else float("nan")
            res["epoch_ms_last"] = float(eps[-1].get("epoch_ms", 0)) if eps else float("nan")
            lags = sorted(e["commit_lag_ms"] for e in eps[-50:] if e.get("commit_lag_ms"))
            res["commit_lag_ms"] = lags[len(lags) // 2] if lags else float("nan")
            res["acks_thinned"] = float(eps[-1].get("output_acks_thinned", 0)) if eps else 0.0
            # the shadow's part of seal->ack: its commit record (+ fsync) before the ack
            # (seal_ms); commit_ms adds the apply and data sync that follow the ack
            evs = [e for e in agents[0].events() if e.get("event") == "committed"][-50:]
            for key in ("seal_ms", "commit_ms"):
                xs = [e[key] for e in evs if key in e]
                res[f"shadow_{key}"] = statistics.median(xs) if xs else float("nan")
        return res
    finally:
        for a in agents:
            a.close()
        vm.kill()
        await vm.wait()
        Path(f"/dev/shm/qsbench-{root.name}-{name}").unlink(missing_ok=True)


async def main(args: argparse.Namespace) -> int:
    from qmpshadow.testing.lan import Lan

    configs: list[tuple[str, tuple[int, int] | None]] = [
        ("none", None), ("oc-20", (20, 20)), ("oc-50", (50, 50)), ("oc-200", (200, 200)),
        ("oc-adaptive", (20, 200))]
    if args.only:
        configs = [c for c in configs if c[0] == "none" or c[0] in args.only.split(",")]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="qsb-", dir="/tmp") as d, Lan.create() as lan:
        cc = args.peer_cc or lan.ns.run(["sysctl", "-n", "net.ipv4.tcp_congestion_control"]
                                        ).stdout.strip()
        print(f"peer congestion control: {cc}; guest TCP buffers: "
              f"{args.tcp_buf or 'kernel default'}; peer socket buffer: "
              f"{args.peer_buf or 'autotuned'}; tap txqueuelen: "
              f"{args.tap_qlen or 'default'}; guest HyStart: "
              f"{'off' if args.no_hystart else 'on'}; NIC {args.nic_model}, receive ring "
              f"{args.rx_desc or 'default'}; ACK thinning {args.ack_thinning}", flush=True)
        for name, epoch in configs:
            print(f"{name}: measuring ...", flush=True)
            results[name] = await run_config(name, Path(d), lan, args, epoch)
            print(f"  {json.dumps(results[name])}", flush=True)
    base = results["none"]
    print(f"\n{'config':<12} {'rtt ms':>8} {'loss %':>7} {'guest->peer':>12} {'ratio':>6} "
          f"{'peer->guest':>12} {'ratio':>6} {'pause ms':>9} {'seal->ack ms':>12} "
          f"{'seal ms':>8} {'commit ms':>9}")
    for name, r in results.items():
        rg = r["from-guest"] / base["from-guest"] if base["from-guest"] else float("nan")
        rp = r["to-guest"] / base["to-guest"] if base["to-guest"] else float("nan")
        print(f"{name:<12} {r['rtt_ms']:>8.1f} {r['ping_loss_pct']:>7.0f} "
              f"{r['from-guest']:>8.1f} Mb/s {rg:>6.2f} {r['to-guest']:>8.1f} Mb/s {rp:>6.2f} "
              f"{r.get('pause_ms', float('nan')):>9.1f} "
              f"{r.get('commit_lag_ms', float('nan')):>12.1f} "
              f"{r.get('shadow_seal_ms', float('nan')):>8.1f} "
              f"{r.get('shadow_commit_ms', float('nan')):>9.1f}")
    if "oc-50" not in results:
        return 0
    r50 = results["oc-50"]
    ratio = min(r50["from-guest"] / base["from-guest"], r50["to-guest"] / base["to-guest"])
    print(f"RESULT tcp_ratio_50ms={ratio:.2f} rtt_ms_50ms={r50['rtt_ms']:.1f}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per TCP direction (5)")
    ap.add_argument("--pings", type=int, default=30, help="pings per configuration (30)")
    ap.add_argument("--mib", type=int, default=128, help="guest RAM in MiB (default 128; "
                    "at 96 the guest's kernel ran out of memory under 16 MiB TCP buffers and "
                    "killed the sender in about 1 run in 3, the anchor's too; the Linux guest "
                    "prints nothing with 64)")
    ap.add_argument("--only", help="comma-separated configurations besides none "
                    "(oc-20,oc-50,oc-200,oc-adaptive); the RESULT line needs oc-50")
    ap.add_argument("--tcp-buf", type=int, default=16 << 20, help="the guest's largest TCP "
                    "buffer in bytes, anchor and protected runs alike (16 MiB, a window for "
                    "~500 Mb/s over a ~65 ms hold; 0: the kernel's default, ~288 KiB for "
                    "96 MiB of RAM)")
    ap.add_argument("--hystart", dest="no_hystart", action="store_false", help="keep the "
                    "guest's CUBIC HyStart on (default: off, anchor and protected runs alike)")
    ap.add_argument("--peer-cc", default="cubic", help="the peer's TCP congestion control, "
                    "set per socket ('cubic'; '': what the namespace inherits from the host)")
    ap.add_argument("--peer-buf", type=int, default=16 << 20, help="the peer socket's "
                    "send (peer -> guest) or receive (guest -> peer) buffer in bytes, fixed "
                    "(16 MiB; 0: the kernel's autotuning, at most 4 MiB sending)")
    ap.add_argument("--nic-model", default="e1000-82545em", help="QEMU's NIC model for the "
                    "guest (default e1000-82545em: unlike e1000, its driver takes more than "
                    "256 receive descriptors)")
    ap.add_argument("--rx-desc", type=int, default=4096, help="the guest's e1000 receive "
                    "ring (default 4096, the most it takes; 0: the driver's default, 256). "
                    "Frames sent to the guest while it is stopped arrive in one burst at "
                    "resume, and QEMU drops what the ring cannot hold (the guest's "
                    "rx_missed_errors: 3-10 per run at 1024, 0 at 4096)")
    ap.add_argument("--tap-qlen", type=int, default=10000, help="the tap's txqueuelen: the "
                    "frames queued towards the guest while it is stopped (10000; 0: the "
                    "kernel's 1000)")
    ap.add_argument("--ack-thinning", default="on", choices=["on", "off"],
                    help="the source agent's --ack-thinning (default on, the product's "
                    "default: one pure ACK per flow per release)")
    ap.add_argument("--settle", type=float, default=3.0, metavar="S",
                    help="seconds between the two TCP directions (3)")
    ap.add_argument("--diag", action="store_true", help="print the peer's ss -ti and its "
                    "cwnd/ssthresh/rtt trail, the guest's sending socket (guest -> peer: "
                    "send queue, cwnd, ssthresh every 0.5 s), peer and guest TCP counters "
                    "(retransmits, losses, drops, HyStart exits) and the tap's ip -s link")
    ap.add_argument("--client", choices=["from-guest", "to-guest", "ping", "stats"],
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client == "ping":
        ping(a.pings, 0.1, 3.0)
        sys.exit(0)
    if a.client == "stats":
        guest_stats()
        sys.exit(0)
    if a.client:
        client(a.client, a.seconds, a.diag, a.peer_cc, a.peer_buf)
        sys.exit(0)
    sys.exit(asyncio.run(main(a)))
