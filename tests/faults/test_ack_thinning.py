"""ACK thinning under output commit, on real QEMU (TCG, shared-RAM source), the real CLI
agents and a real TCP peer in a private LAN (a network namespace).

The peer sends 8 MiB to the Linux test guest (serve mode: port 5002 swallows what it
receives); every ACK the guest sends back is held by the source agent until its epoch
commits. With ``--ack-thinning on`` (the default) each release carries one pure ACK per
flow instead of all of them; with ``off`` every held ACK goes out. Either way the guest
must acknowledge every byte (nothing the transfer needs is lost), and the counter of thinned
ACKs must say which mode ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.testing.lan import Lan
from qmpshadow.testing.netns import netns_unavailable_reason
from tests.faults.e2e import shadow_agent, source_agent
from tests.faults.test_output_commit import GUEST_ARGS, GUEST_IP, write_net_spec
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
SIZE = 8 << 20

# Runs in the namespace: connect to the guest's sink (retrying while it boots), send SIZE
# bytes, wait until the guest has acknowledged all of them, print what TCP_INFO says.
PEER = r"""
import fcntl, json, socket, struct, sys, termios, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 90
while True:
    try:
        s = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
t0 = time.monotonic()
buf, sent = b"\x5a" * 65536, 0
while sent < size:
    sent += s.send(buf[:size - sent])
while True:
    unacked = int.from_bytes(fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4),
                             sys.byteorder)
    if not unacked or time.monotonic() - t0 > 60:
        break
    time.sleep(0.02)
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
retrans, = struct.unpack_from("=I", info, 100)
segs_out, segs_in = struct.unpack_from("=II", info, 136)
print(json.dumps({"sent": sent, "unacked": unacked, "seconds": time.monotonic() - t0,
                  "segs_in": segs_in, "segs_out": segs_out, "retrans": retrans}))
"""


@pytest.mark.parametrize("thinning", ["on", "off"])
async def test_transfer_to_the_guest(launch_vm: LaunchVm, short_tmp: Path, tcg: AccelChoice,
                                     thinning: str) -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 10000}{thinning[1]}"
    spec_path = write_net_spec(short_tmp / "vm.toml", short_tmp / "primary.ram",
                               output_commit=True, tag=tag,
                               kernel_args=f"{GUEST_ARGS} lg.mode=serve lg.mib=1 lg.delay=1")
    spec = VmSpec.from_toml(spec_path)
    with Lan.create() as lan:
        shadow = source = None
        try:
            vm = await launch_vm(spec, accel=tcg)
            lan.attach(spec.nics[0].ifname)
            link = f"unix:{short_tmp / 'link.sock'}"
            shadow = shadow_agent(spec_path, short_tmp / "replica", link,
                                  short_tmp / "shadow.out", [])
            await shadow.wait_event(lambda e: e.get("event") == "shadow-ready")
            source = source_agent(spec_path, vm.run.qmp2_sock, link, short_tmp / "source.out",
                                  [], extra=["--interval", "50", "--ack-thinning", thinning])
            await shadow.wait_event(lambda e: e.get("event") == "committed"
                                    and e["epoch"] >= 3, timeout=60, also=[source])
            t0 = time.monotonic()
            done = await asyncio.to_thread(
                subprocess.run, lan.ns.exec_argv([sys.executable, "-c", PEER, GUEST_IP, "5002",
                                                  str(SIZE)]),
                capture_output=True, text=True, timeout=180, check=False)
            elapsed = time.monotonic() - t0
            assert done.returncode == 0, (done.stderr[-2000:], source.text()[-2000:])
            peer = json.loads(done.stdout)
            # two epochs on: every ACK of the transfer has been released and counted
            seen = max(e["epoch"] for e in source.events() if e.get("event") == "epoch")
            last = await source.wait_event(lambda e: e.get("event") == "epoch"
                                           and e["epoch"] >= seen + 2, timeout=30)
            report = {**peer, "thinned": last.get("output_acks_thinned"),
                      "released": last.get("output_released"), "elapsed": elapsed}
            print(f"ack thinning {thinning}:", json.dumps(report))
            assert peer["sent"] == SIZE and peer["unacked"] == 0, report
            if thinning == "on":
                assert report["thinned"] > 0, report
                # one ACK per release (plus a few the rules keep) instead of one per one or
                # two segments the guest received
                assert peer["segs_in"] < peer["segs_out"] / 10, report
            else:
                assert report["thinned"] == 0, report
        finally:
            for a in (source, shadow):
                if a is not None:
                    a.close()

